"""Guest memory (regions, translation, bounds, memfd mapping) and split virtqueues (chains, used ring,
notification suppression) as the switch sees them."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import subprocess
import sys

import pytest

from harness.vsock.errors import GuestFault
from harness.vsock.memory import GuestMemory, MemoryRegion
from harness.vsock.virtqueue import (
    DESC,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_CHAIN,
    U16,
    ChainFault,
    RingAddresses,
    SplitQueue,
)

USER = 0x7F00_0000_0000


def two_regions() -> tuple[GuestMemory, bytearray, bytearray]:
    low, high = bytearray(0x10000), bytearray(0x10000)
    memory = GuestMemory.synthetic([
        (MemoryRegion(0x0, 0x10000, USER), low),
        (MemoryRegion(0x100000, 0x10000, USER + 0x200000), high),
    ])  # fmt: skip
    return memory, low, high


def test_gpa_and_user_addresses_translate_to_the_same_bytes() -> None:
    memory, low, high = two_regions()
    memory.gpa(0x100010, 4)[:] = b"abcd"
    assert bytes(high[0x10:0x14]) == b"abcd"
    assert bytes(memory.uva(USER + 0x200010, 4)) == b"abcd"
    memory.uva(USER + 8, 2)[:] = b"zz"
    assert bytes(low[8:10]) == b"zz"


@pytest.mark.parametrize(
    ("addr", "length"),
    [(0xFFFF, 2), (0x10000, 1), (0xFFFFF, 2), (0x110000, 1), (2**64 - 1, 1), (0x50000, 0), (0x110001, 0)],
)
def test_accesses_outside_or_across_regions_fault(addr: int, length: int) -> None:
    memory, _, _ = two_regions()
    with pytest.raises(GuestFault) as fault:
        memory.gpa(addr, length)
    assert fault.value.reason == "bad_address"


def test_overlapping_regions_are_refused() -> None:
    with pytest.raises(GuestFault):
        GuestMemory.synthetic(
            [
                (MemoryRegion(0, 0x2000, USER), bytearray(0x2000)),
                (MemoryRegion(0x1000, 0x2000, USER + 0x10000), bytearray(0x2000)),
            ]
        )


def test_memfd_regions_with_offsets_are_mapped_shared() -> None:
    fd = os.memfd_create("test-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 0x40000)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        regions = [
            MemoryRegion(0x0, 0xA0000 - 0x60000, USER, 0),
            MemoryRegion(0x100000, 0x10000, USER + 0x100000, 0x30000),
        ]
        memory = GuestMemory.from_fds(regions, [fd, fd])
        memory.gpa(0x100000, 5)[:] = b"hello"
        with mmap.mmap(fd, 0x40000) as view:
            assert view[0x30000:0x30005] == b"hello"
        memory.close()
        with pytest.raises(GuestFault):
            GuestMemory.from_fds([MemoryRegion(0, 0x1000, USER, 0x100000000)], [fd])  # past the file
    finally:
        os.close(fd)


# -- virtqueues -----------------------------------------------------------------------------------
QSIZE = 8
DESC_AT, AVAIL_AT, USED_AT = 0x0, 0x1000, 0x2000


def queue(event_idx: bool = True) -> tuple[SplitQueue, bytearray]:
    ram = bytearray(0x10000)
    memory = GuestMemory.synthetic([(MemoryRegion(0, len(ram), USER), ram)])
    addrs = RingAddresses(USER + DESC_AT, USER + AVAIL_AT, USER + USED_AT)
    return SplitQueue(memory, QSIZE, addrs, event_idx=event_idx), ram


def offer(ram: bytearray, slot: int, head: int) -> None:
    U16.pack_into(ram, AVAIL_AT + 4 + 2 * slot, head)
    U16.pack_into(ram, AVAIL_AT + 2, slot + 1)


def test_a_chain_yields_readable_then_writable_views() -> None:
    q, ram = queue()
    DESC.pack_into(ram, DESC_AT + 16 * 2, 0x4000, 44, DESC_F_NEXT, 5)
    DESC.pack_into(ram, DESC_AT + 16 * 5, 0x5000, 100, DESC_F_NEXT | DESC_F_WRITE, 1)
    DESC.pack_into(ram, DESC_AT + 16 * 1, 0x6000, 50, DESC_F_WRITE, 0)
    offer(ram, 0, 2)
    chain = q.pop()
    assert chain is not None and chain.head == 2
    assert [len(v) for v in chain.readable] == [44] and [len(v) for v in chain.writable] == [100, 50]
    assert (chain.readable_len, chain.writable_len) == (44, 150)
    assert q.pop() is None


@pytest.mark.parametrize(
    ("descs", "reason"),
    [
        ({0: (0x4000, 8, DESC_F_NEXT, 1), 1: (0x4000, 8, DESC_F_NEXT, 0)}, "desc_loop"),
        ({0: (0x4000, 8, DESC_F_NEXT, QSIZE)}, "desc_index"),
        ({0: (0x4000, 8, 4, 0)}, "indirect_desc"),
        ({0: (0xFFF0, 0x20, 0, 0)}, "bad_address"),
        ({0: (0x4000, 8, DESC_F_NEXT | DESC_F_WRITE, 1), 1: (0x5000, 8, 0, 0)}, "desc_order"),
    ],
)
def test_bad_chains_fault_and_can_be_returned(descs: dict, reason: str) -> None:
    q, ram = queue()
    for index, desc in descs.items():
        DESC.pack_into(ram, DESC_AT + 16 * index, *desc)
    offer(ram, 0, 0)
    with pytest.raises(ChainFault) as fault:
        q.pop()
    assert fault.value.reason == reason and fault.value.head == 0


def test_a_head_out_of_range_cannot_be_returned() -> None:
    q, ram = queue()
    offer(ram, 0, QSIZE + 1)
    with pytest.raises(ChainFault) as fault:
        q.pop()
    assert fault.value.head is None


def test_an_avail_index_running_past_the_ring_breaks_the_queue() -> None:
    q, ram = queue()
    U16.pack_into(ram, AVAIL_AT + 2, QSIZE + 1)
    with pytest.raises(GuestFault):
        q.pop()
    assert q.broken == "avail_overrun" and q.pop() is None


def test_used_elements_are_published_once_per_batch() -> None:
    q, ram = queue()
    for i in range(3):
        q.push(i, 10 * i)
        assert U16.unpack_from(ram, USED_AT + 2)[0] == 0  # not visible before publish
    q.publish()
    assert U16.unpack_from(ram, USED_AT + 2)[0] == 3
    assert [struct.unpack_from("<II", ram, USED_AT + 4 + 8 * i) for i in range(3)] == [
        (0, 0),
        (1, 10),
        (2, 20),
    ]


def test_event_idx_interrupts_only_when_the_driver_asked() -> None:
    q, ram = queue(event_idx=True)
    U16.pack_into(ram, AVAIL_AT + 4 + 2 * QSIZE, 5)  # used_event: interrupt when used idx passes 5
    for i in range(3):
        q.push(i, 0)
    assert not q.publish()  # used idx 3
    for i in range(3):
        q.push(i, 0)
    assert q.publish()  # used idx 6 passed 5
    q.push(0, 0)
    assert not q.publish()


def test_without_event_idx_the_no_interrupt_flag_is_honoured() -> None:
    q, ram = queue(event_idx=False)
    q.push(0, 0)
    assert q.publish()
    U16.pack_into(ram, AVAIL_AT, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    q.push(1, 0)
    assert not q.publish()


def test_arm_kick_asks_for_the_next_buffer_and_reports_a_race() -> None:
    q, ram = queue(event_idx=True)
    assert not q.arm_kick()
    assert U16.unpack_from(ram, USED_AT + 4 + 8 * QSIZE)[0] == 0  # avail_event = next avail index
    DESC.pack_into(ram, DESC_AT, 0x4000, 8, 0, 0)
    offer(ram, 0, 0)
    assert q.arm_kick()  # a buffer arrived: the caller drains again instead of sleeping


# A driver on another CPU, reading the used ring's index and avail_event with single 16-bit loads.
_WATCHER = """
import mmap, sys, time
fd, used = int(sys.argv[1]), int(sys.argv[2])
view = memoryview(mmap.mmap(fd, 0x10000)).cast("H")
seen, torn = 0, 0
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    for _ in range(1000):
        for value in (view[used // 2 + 1], view[used // 2 + 2 + 4 * 8]):
            torn += value not in (0x00FF, 0x0100)
    seen += 2000
print(seen, torn)
"""


def test_ring_indices_are_written_whole_while_the_driver_reads_them() -> None:
    """used.idx and avail_event go from 0x00FF to 0x0100 and back while another process reads them: it
    never sees a value halfway (0x0000 or 0x01FF), as it did when struct wrote the two bytes one by one."""
    fd = os.memfd_create("ring", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 0x10000)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    memory = GuestMemory.from_fds([MemoryRegion(0, 0x10000, USER)], [fd])
    q = SplitQueue(memory, QSIZE, RingAddresses(USER, USER + AVAIL_AT, USER + USED_AT), event_idx=True)
    q.used_idx = q.last_avail = 0x00FF
    q.publish()
    q.arm_kick()
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(fd), str(USED_AT), "0.5"],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout.readline() == "ready\n"  # type: ignore[union-attr]
        while watcher.poll() is None:
            for value in (0x0100, 0x00FF) * 500:
                q.used_idx = q.last_avail = value
                q.publish()
                q.arm_kick()
        seen, torn = map(int, watcher.stdout.read().split())  # type: ignore[union-attr]
    finally:
        watcher.wait()
        memory.close()
        os.close(fd)
    assert seen > 0 and torn == 0, f"{torn} of {seen} reads saw half an index update"


class CountingMemory(GuestMemory):
    """Guest memory that counts the descriptor buffers it is asked for."""

    lookups = 0

    def gpa(self, addr: int, length: int) -> memoryview:
        self.lookups += 1
        return super().gpa(addr, length)


def test_a_chain_costs_at_most_max_chain_descriptors_however_large_the_ring() -> None:
    """A front end may set a 32768-entry ring: a looping chain is given up after MAX_CHAIN descriptors,
    not after walking the whole ring (128 such chains per batch held the loop for 5 s)."""
    size = 32768
    ram = bytearray(0x100000)  # descriptors, then the avail ring at 0x80000, the used ring at 0x98000
    memory = CountingMemory(GuestMemory.synthetic([(MemoryRegion(0, len(ram), USER), ram)])._mapped)
    avail, used = 16 * size, 16 * size + 0x18000
    for i in range(size):
        DESC.pack_into(ram, 16 * i, len(ram) - 16, 8, DESC_F_NEXT, (i + 1) % size)  # one loop over all
    q = SplitQueue(memory, size, RingAddresses(USER, USER + avail, USER + used), event_idx=False)
    U16.pack_into(ram, avail + 2, 1)  # head 0 is available
    with pytest.raises(ChainFault) as fault:
        q.pop()
    assert fault.value.reason == "chain_too_long" and memory.lookups == MAX_CHAIN
    DESC.pack_into(ram, 16 * (MAX_CHAIN - 1), len(ram) - 16, 8, 0, 0)  # end the chain at MAX_CHAIN
    chain = q.walk(0)
    assert len(chain.readable) == MAX_CHAIN
