"""A hostile guest against the switch: random descriptor tables, avail rings and packet headers.

Over 10,000 generated cases: no exception escapes the switch, every guest-memory access it makes lies inside
the guest's regions, it writes only to used rings and device-writable rx buffers, every drop is counted
under a known reason, and a flow between two well-behaved sibling VMs keeps working.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.vsock import device as device_module
from harness.vsock import switch as switch_module
from harness.vsock.device import BATCH, RX_QUEUE, TX_QUEUE, VsockDevice
from harness.vsock.fake_guest import USER_BASE, FakeGuest, GuestConn
from harness.vsock.memory import GuestMemory, MemoryRegion
from harness.vsock.packet import HEADER, HEADER_SIZE, Header
from harness.vsock.switch import Switch
from harness.vsock.virtqueue import DESC, U16, Chain, SplitQueue

A, B, C = 5, 6, 7
QUEUE = 16
RAM_KIB = 128
KNOWN_REASONS = {
    "bad_address",
    "desc_index",
    "desc_loop",
    "chain_too_long",
    "desc_order",
    "indirect_desc",
    "avail_overrun",
    "short_header",
    "bad_len",
    "oversize",
    "forged_src_cid",
    "unknown_type",
    "unknown_op",
    "credit_violation",
    "rw_not_established",
    "unexpected_response",
    "duplicate_request",
    "bad_rx_buffer",
    "rx_backlog_full",
    "too_many_flows",
    "rw_after_shutdown",
}


class RecordingQueue(SplitQueue):
    """A split queue that notes the device-writable ranges of every chain it hands out."""

    writable: list[tuple[int, int]]

    def walk(self, head: int) -> Chain:
        chain = super().walk(head)
        index = head
        for _ in range(len(chain.readable) + len(chain.writable)):
            addr, length, flags, nxt = DESC.unpack_from(self._desc, 16 * index)
            if flags & 2:
                self.writable.append((addr, addr + length))
            index = nxt
        return chain


class AuditedMemory(GuestMemory):
    """Guest memory that records every access it grants."""

    def __init__(self, ram: memoryview, size: int) -> None:
        other = GuestMemory.synthetic([(MemoryRegion(0, size, USER_BASE), ram)])
        super().__init__(other._mapped)
        self.size = size
        self.granted: list[tuple[str, int, int]] = []

    def gpa(self, addr: int, length: int) -> memoryview:
        view = super().gpa(addr, length)
        self.granted.append(("gpa", addr, length))
        return view

    def uva(self, addr: int, length: int) -> memoryview:
        view = super().uva(addr, length)
        self.granted.append(("uva", addr, length))
        return view


@dataclass
class Rig:
    loop: asyncio.AbstractEventLoop
    switch: Switch
    a: FakeGuest
    a_dev: VsockDevice
    a_mem: AuditedMemory
    b: FakeGuest
    c: FakeGuest
    bc: GuestConn
    cb: GuestConn
    errors: list[object]


def settle(rig: Rig, rounds: int = 4) -> None:
    for _ in range(rounds):
        rig.loop.run_until_complete(asyncio.sleep(0))
        rig.b.pump()
        rig.c.pump()


_LOOP = asyncio.new_event_loop()


def build_rig() -> Rig:
    loop = _LOOP
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    switch = Switch(loop)
    guests = {}
    for cid in (A, B, C):
        guests[cid] = FakeGuest(cid, ram_kib=RAM_KIB, queue_size=QUEUE, max_payload=4096)
    a, b, c = guests[A], guests[B], guests[C]
    devs = {cid: switch.attach(f"vm{cid}", cid, "g", _no_uds()) for cid in (A, B, C)}
    b.attach(devs[B])
    c.attach(devs[C])
    a_mem = AuditedMemory(a.ram, a.size)
    a_dev = devs[A]
    rx = RecordingQueue(a_mem, QUEUE, a.rx.user_addrs(), event_idx=True)
    rx.writable = []
    a_dev.start_queue(RX_QUEUE, rx, None)
    a_dev.start_queue(TX_QUEUE, SplitQueue(a_mem, QUEUE, a.tx.user_addrs(), event_idx=True), None)
    c.listen(100)
    bc = b.connect(C, 100)
    rig = Rig(loop, switch, a, a_dev, a_mem, b, c, bc, None, errors)  # type: ignore[arg-type]
    settle(rig)
    assert bc.state == "established", "setup: the B-C flow did not come up"
    rig.cb = c.accepted.popleft()
    return rig


def _no_uds():
    from pathlib import Path

    return Path("/nonexistent/vsock.sock")


# -- strategies -----------------------------------------------------------------------------------
# Raw bytes are cheap to generate; a few structured overrides make chains that reach deep into the switch.
def addresses(size: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, size), st.integers(0, 64).map(lambda k: size - k), st.integers(0, 2**64 - 1)
    )


lengths = st.one_of(st.integers(0, 64), st.integers(0, 70_000), st.integers(0, 2**32 - 1))
descriptor_fixes = st.lists(
    st.tuples(
        st.integers(0, QUEUE - 1),
        addresses(RAM_KIB * 1024),
        lengths,
        st.integers(0, 7),
        st.integers(0, QUEUE + 4),
    ),
    max_size=10,
)
u32 = st.integers(0, 2**32 - 1)
header_fixes = st.tuples(
    st.binary(min_size=44, max_size=44),
    st.sampled_from([A, A, A, B, 2, 0]),  # src_cid: mostly our own
    st.sampled_from([2, B, C, A, 99, 1]),  # dst_cid
    st.sampled_from([100, 1024, 50001, 7]),  # ports
    st.one_of(st.integers(0, 64), st.integers(0, 70_000), u32),  # len
    st.sampled_from([1, 1, 1, 2, 0]),  # type
    st.integers(0, 9),  # op
)


@dataclass
class Attack:
    tx_table: bytes
    tx_fixes: list[tuple[int, int, int, int, int]]
    tx_avail: bytes
    tx_idx: int
    rx_table: bytes
    rx_fixes: list[tuple[int, int, int, int, int]]
    rx_avail: bytes
    rx_idx: int
    packets: list[tuple]
    tx_flags: int
    chains: bool  # tx: well-formed chains, one per packet, then the fixes on top
    keep_rx: bool  # rx: the driver's own well-formed buffers, then the fixes on top


table = st.binary(min_size=16 * QUEUE, max_size=16 * QUEUE)
avail = st.binary(min_size=2 * QUEUE, max_size=2 * QUEUE)
index = st.one_of(st.integers(0, QUEUE + 2), st.integers(0, 0xFFFF))
attacks = st.builds(
    Attack,
    tx_table=table,
    tx_fixes=descriptor_fixes,
    tx_avail=avail,
    tx_idx=index,
    rx_table=table,
    rx_fixes=descriptor_fixes,
    rx_avail=avail,
    rx_idx=index,
    packets=st.lists(header_fixes, min_size=1, max_size=8),
    tx_flags=st.integers(0, 3),
    chains=st.booleans(),
    keep_rx=st.booleans(),
)


def _small_heads(raw: bytes) -> bytes:
    """Avail entries mostly in range (a head index is taken modulo a little more than the queue size)."""
    heads = struct.unpack(f"<{QUEUE}H", raw)
    return struct.pack(f"<{QUEUE}H", *(h % (QUEUE + 3) if h & 1 else h for h in heads))


def plant(rig: Rig, attack: Attack) -> list[tuple[int, int]]:
    """Write the attack into A's RAM; returns the used rings (the switch may also write rx buffers)."""
    a = rig.a
    ram = a.ram
    base = a._tx_base  # packets go where the fixed-up descriptors point: 4 KiB slots past the rx buffers
    for i, (raw, src, dst, port, length, kind, op) in enumerate(attack.packets):
        fields = list(HEADER.unpack(raw))
        fields[0], fields[1], fields[3], fields[4], fields[5], fields[6] = src, dst, port, length, kind, op
        HEADER.pack_into(ram, base + i * 4096, *fields)
    for q, raw_table, fixes, raw_avail, idx, is_tx in (
        (a.tx, attack.tx_table, attack.tx_fixes, attack.tx_avail, attack.tx_idx, True),
        (a.rx, attack.rx_table, attack.rx_fixes, attack.rx_avail, attack.rx_idx, False),
    ):
        if is_tx and attack.chains:
            for i, (_raw, _src, _dst, _port, length, _kind, _op) in enumerate(attack.packets):
                slot = base + i * 4096
                DESC.pack_into(ram, q.desc + 32 * i, slot, HEADER_SIZE, 1, 2 * i + 1)
                DESC.pack_into(
                    ram, q.desc + 32 * i + 16, slot + HEADER_SIZE, min(length, 4096 - HEADER_SIZE), 0, 0
                )
                U16.pack_into(ram, q.avail + 4 + 2 * i, 2 * i)
            idx = len(attack.packets) + idx % 3 if idx < 0x100 else idx
        elif is_tx or not attack.keep_rx:
            ram[q.desc : q.desc + 16 * QUEUE] = raw_table
            ram[q.avail + 4 : q.avail + 4 + 2 * QUEUE] = _small_heads(raw_avail)
        else:
            idx = q.avail_idx
        for i, addr, length, flags, nxt in fixes[: 3 if (is_tx and attack.chains) else None]:
            if is_tx and i % 2 == 0:
                addr = base + (addr % 8) * 4096
            DESC.pack_into(ram, q.desc + 16 * i, addr, length, flags, nxt)
        U16.pack_into(ram, q.avail + 2, idx)
    U16.pack_into(ram, a.tx.avail, attack.tx_flags)
    return [(q.used, q.used + 4 + 8 * QUEUE + 2) for q in (a.rx, a.tx)]


_MASKS = (
    2**64 - 1,
    2**64 - 1,
    2**32 - 1,
    2**32 - 1,
    2**32 - 1,
    0xFFFF,
    0xFFFF,
    2**32 - 1,
    2**32 - 1,
    2**32 - 1,
)


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def changed_ranges(before: bytes, after: bytes) -> list[tuple[int, int]]:
    out = []
    i = 0
    n = len(before)
    while i < n:
        if before[i] != after[i]:
            j = i
            while j < n and before[j] != after[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def diff(before: bytes, after: bytes) -> list[tuple[int, int]]:
    """Changed byte ranges, found by comparing 4 KiB pages first (fast when little changed)."""
    ranges = []
    for page in range(0, len(before), 4096):
        if before[page : page + 4096] != after[page : page + 4096]:
            for lo, hi in changed_ranges(before[page : page + 4096], after[page : page + 4096]):
                ranges.append((page + lo, page + hi))
    return ranges


@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(attacks)
def test_hostile_guest_cannot_hurt_the_switch_or_its_siblings(attack: Attack) -> None:
    rig = build_rig()
    allowed = plant(rig, attack)
    before = bytes(rig.a.ram)
    # Traffic towards A too, so its (hostile) rx ring is used.
    rig.b.send_packet(rig.b._hdr(GuestConn(4000, A, 77), 1))
    rig.a_dev.kick(TX_QUEUE)
    rig.a_dev.kick(RX_QUEUE)
    settle(rig)
    rig.a_dev.kick(TX_QUEUE)
    settle(rig)
    after = bytes(rig.a.ram)

    assert rig.errors == [], f"an exception escaped the switch: {rig.errors[0]}"
    for kind, addr, length in rig.a_mem.granted:
        base = USER_BASE if kind == "uva" else 0
        assert base <= addr and addr + length <= base + rig.a.size, (kind, hex(addr), length)
    allowed = merged(allowed + rig.a_dev.queues[RX_QUEUE].writable)  # type: ignore[attr-defined]
    for lo, hi in diff(before, after):
        assert any(a <= lo and hi <= b for a, b in allowed), f"switch wrote A's RAM at [{lo:#x}, {hi:#x})"
    assert set(rig.a_dev.drops) <= KNOWN_REASONS, rig.a_dev.drops
    assert not rig.switch.host_sides[rig.a_dev].connections
    grp = rig.switch.groups["g"]
    opened = {id(flow): flow.initiator.cid for flow in grp.flows.values()}
    for cid in (A, B, C):  # the per-VM flow counts match the flows each opened in the table
        assert grp.flow_counts[cid] == sum(1 for opener in opened.values() if opener == cid), cid
    # The well-behaved siblings are untouched and still talk.
    payload = hashlib.sha256(repr(attack).encode()).digest() * 300
    rig.b.write(rig.bc, payload)
    got = b""
    for _ in range(20):
        settle(rig, 2)
        got += rig.c.read(rig.cb)
        if len(got) >= len(payload):
            break
    assert got == payload
    assert rig.bc.state == "established" and not rig.bc.reset
    for guest in (rig.b, rig.c):
        assert not guest.device.drops, guest.device.drops  # type: ignore[union-attr]


def test_hostile_packets_are_counted_by_reason() -> None:
    """Each rule a packet can break has its own counter."""
    rig = build_rig()
    a = rig.a
    a.attach(rig.a_dev)  # a well-formed driver, sending bad packets
    cases = [
        ("forged_src_cid", (B, C, 1, 100, 0, 1, 1, 0, 0, 0), b""),
        ("unknown_type", (A, C, 1, 100, 0, 7, 1, 0, 0, 0), b""),
        ("bad_len", (A, C, 1, 100, 500, 1, 5, 0, 0, 0), b"x" * 10),
        ("oversize", (A, 2, 1, 100, 70_000, 1, 5, 0, 0, 0), b""),
    ]
    for reason, fields, payload in cases:
        a.send_packet(Header(*fields), payload)
        settle(rig)
        assert rig.a_dev.drops[reason] == 1, (reason, rig.a_dev.drops)
    # an unknown op on an open flow resets only that flow
    c = rig.c
    c.listen(200)
    conn = a.connect(C, 200)
    settle(rig)
    a.pump()
    assert conn.state == "established"
    a.send_packet(a._hdr(conn, 9))
    settle(rig)
    a.pump()
    assert rig.a_dev.drops["unknown_op"] == 1
    assert conn.reset
    assert not rig.bc.reset


def test_credit_violation_resets_only_that_flow() -> None:
    rig = build_rig()
    a = rig.a
    a.attach(rig.a_dev)
    rig.c.listen(300)
    conn = a.connect(C, 300)
    settle(rig)
    a.pump()
    assert conn.state == "established"
    conn.peer_buf_alloc = 10**9  # lie to ourselves about the receiver's window, then overrun it
    a.write(conn, bytes(600_000))  # C offers 256 KiB and reads nothing
    for _ in range(100):
        settle(rig)
        a.pump()
    assert rig.a_dev.drops["credit_violation"] == 1
    assert conn.reset
    victim = rig.c.find(A, conn.local_port)
    assert victim is not None and victim.reset
    assert not rig.bc.reset and rig.bc.state == "established"


def test_a_vm_has_a_bounded_number_of_sibling_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(switch_module, "MAX_FLOWS_PER_VM", 2)
    rig = build_rig()
    a, grp = rig.a, rig.switch.groups["g"]
    a.attach(rig.a_dev)
    rig.c.listen(400)
    conns = [a.connect(C, 400) for _ in range(3)]
    settle(rig)
    a.pump()
    assert [conn.state for conn in conns] == ["established", "established", "closed"]
    assert rig.a_dev.drops["too_many_flows"] == 1 and grp.flow_counts[A] == 2
    a.send_packet(a._hdr(conns[0], 3))  # A resets one of its flows: its slot is free again
    settle(rig)
    again = a.connect(C, 400)
    settle(rig)
    a.pump()
    assert again.state == "established" and grp.flow_counts[A] == 2
    assert rig.a_dev.drops["too_many_flows"] == 1 and not rig.bc.reset


def test_many_small_writes_to_a_slow_reader_arrive_whole() -> None:
    """More one-byte packets than the backlog has packet slots, inside the reader's credit: all arrive."""
    rig = build_rig()
    sent = bytes(i % 251 for i in range(device_module.MAX_BACKLOG_PACKETS + 1000))
    for i in range(len(sent)):  # C reads nothing meanwhile
        rig.b.write(rig.bc, sent[i : i + 1])
    got = b""
    for _ in range(100):
        settle(rig, 1)
        got += rig.c.read(rig.cb)
        if len(got) >= len(sent):
            break
    assert got == sent
    assert not rig.c.device.drops and not rig.bc.reset  # type: ignore[union-attr]


def test_sibling_data_the_reader_cannot_take_resets_the_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the reader's backlog is full, its flow is reset at both ends rather than losing bytes from the
    middle of the stream."""
    monkeypatch.setattr(device_module, "MAX_BACKLOG_BYTES", 64 * 1024)
    rig = build_rig()
    sent = hashlib.sha256(b"stream").digest() * 6000  # 192,000 bytes: inside C's credit, past its backlog
    rig.b.write(rig.bc, sent)
    settle(rig)
    assert rig.bc.reset  # the writer learns at once
    got = b""
    for _ in range(50):
        settle(rig, 1)
        got += rig.c.read(rig.cb)
    assert rig.cb.reset and rig.c.device.drops["rx_backlog_full"] >= 1  # type: ignore[union-attr]
    assert got == sent[: len(got)]  # what arrived is the stream's start, without a gap


def test_hostile_ring_index_breaks_only_that_vm() -> None:
    rig = build_rig()
    a = rig.a
    U16.pack_into(a.ram, a.tx.avail + 2, QUEUE + 5)  # avail idx runs past the ring
    rig.a_dev.kick(TX_QUEUE)
    settle(rig)
    assert rig.a_dev.broken == "avail_overrun"
    assert rig.a_dev.drops["avail_overrun"] == 1
    rig.b.write(rig.bc, b"still here")
    settle(rig)
    assert rig.c.read(rig.cb) == b"still here"
    # The guest resets its device (QEMU stops both rings) and sets up fresh rings: A works again.
    rig.a_dev.stop_queue(RX_QUEUE)
    rig.a_dev.stop_queue(TX_QUEUE)
    fresh = FakeGuest(A, ram_kib=RAM_KIB, queue_size=QUEUE, max_payload=4096)
    fresh.attach(rig.a_dev)
    assert rig.a_dev.running
    rig.c.listen(600)
    conn = fresh.connect(C, 600)
    settle(rig)
    fresh.pump()
    assert conn.state == "established"


class RacingQueue(SplitQueue):
    """A driver whose other vCPU, once ``racing``, posts one more bad head each time the device takes one."""

    ram: memoryview
    avail_at: int
    racing = False
    pops = 0

    def pop(self) -> Chain | None:
        if self.racing:
            self.pops += 1
            assert self.pops <= 4 * BATCH, "the device kept taking chains without yielding the loop"
            U16.pack_into(self.ram, self.avail_at + 4 + 2 * (self.last_avail % self.size), 0xFFFF)
            U16.pack_into(self.ram, self.avail_at + 2, (self.last_avail + 1) & 0xFFFF)
        return super().pop()


def racing_queue(rig: Rig, index: int) -> RacingQueue:
    ring = rig.a.rx if index == RX_QUEUE else rig.a.tx
    queue = RacingQueue(rig.a_mem, QUEUE, ring.user_addrs(), event_idx=True)
    queue.ram, queue.avail_at = rig.a.ram, ring.avail
    rig.a_dev.start_queue(index, queue, None)
    settle(rig)  # nothing left pending before the race starts
    queue.racing = True
    return queue


def one_round(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks that are ready now, once (what one turn of the loop gives the switch)."""
    loop.call_soon(loop.stop)
    loop.run_forever()


def test_a_stream_of_bad_tx_chains_yields_the_loop_after_a_batch() -> None:
    rig = build_rig()
    queue = racing_queue(rig, TX_QUEUE)
    rig.a_dev.kick(TX_QUEUE)
    assert queue.pops == BATCH and rig.a_dev.drops["desc_index"] == BATCH
    one_round(rig.loop)  # the next batch comes in the next round, after the other VMs' work
    assert queue.pops == 2 * BATCH
    queue.racing = False
    settle(rig)  # leave nothing pending on the shared loop
    assert rig.errors == []


def test_a_stream_of_bad_rx_buffers_yields_the_loop_after_a_batch() -> None:
    rig = build_rig()
    queue = racing_queue(rig, RX_QUEUE)
    rig.a_dev.enqueue(Header(B, A, 1, 2, 0, 1, 1, 0, 0, 0))  # a packet for A, waiting for an rx buffer
    one_round(rig.loop)
    assert queue.pops == BATCH and rig.a_dev.drops["desc_index"] == BATCH
    one_round(rig.loop)
    assert queue.pops == 2 * BATCH and len(rig.a_dev.backlog) == 1
    queue.racing = False
    settle(rig)
    assert rig.errors == []


def test_packets_to_other_groups_are_refused() -> None:
    """A VM in another group with the same CID as a sibling is unreachable; CIDs are scoped per group."""
    rig = build_rig()
    other = FakeGuest(C, ram_kib=RAM_KIB, queue_size=QUEUE, max_payload=4096)
    other.attach(rig.switch.attach("other", C, "h", _no_uds()))  # CID 7 again, in group h
    other.listen(500)
    rig.a.attach(rig.a_dev)
    conn = rig.a.connect(C, 500)  # reaches group g's CID 7, which does not listen on 500
    settle(rig)
    rig.a.pump()
    other.pump()
    assert conn.reset
    assert not other.accepted
    lonely = rig.a.connect(8, 500)  # no CID 8 in group g
    settle(rig)
    rig.a.pump()
    assert lonely.reset


def test_struct_sizes() -> None:
    assert HEADER_SIZE == 44 and struct.calcsize("<QIHH") == 16
