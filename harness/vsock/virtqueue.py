"""Split virtqueues (virtio spec, "Split Virtqueues") over guest memory, guarded against a hostile driver.

``pop`` walks one descriptor chain with bounds, loop and order checks; ``push`` writes a used element and
``publish`` makes a batch visible with one index update, answering whether the driver wants an interrupt
(``VIRTIO_RING_F_EVENT_IDX`` or the avail flags). Faults of one chain raise ``ChainFault`` (the chain can
still be returned); faults of the ring itself mark the queue broken.

The driver reads and writes the rings' 16-bit fields while the switch does: they are accessed through
16-bit memoryviews, one load or store each (``struct`` writes byte by byte, so a reader could see half an
update), and a full barrier separates a store the driver must see from the load that depends on it.
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass

from harness.vsock.errors import GuestFault
from harness.vsock.memory import GuestMemory

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id, len

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
# Descriptors in one chain: Linux sends a header and at most MAX_SKB_FRAGS (17) buffers. Without a bound a
# front end that sets a 32768-entry ring makes every chain (or loop) cost 32768 steps: 5 s per batch.
MAX_CHAIN = 64
if sys.byteorder != "little":  # the 16-bit views below are native, virtio rings are little-endian
    raise ImportError("the vsock switch's virtqueues need a little-endian host")
_FENCE = threading.Lock()


def full_barrier() -> None:
    """Order this thread's earlier stores before its later loads: taking a lock is a locked
    read-modify-write, which is a full barrier on x86-64, the hosts the switch serves."""
    _FENCE.acquire()
    _FENCE.release()


class ChainFault(GuestFault):
    """A descriptor chain broke a rule; ``head`` is returned to the driver unless it is itself invalid."""

    def __init__(self, reason: str, detail: str, head: int | None) -> None:
        super().__init__(reason, detail)
        self.head = head


@dataclass(frozen=True)
class RingAddresses:
    """Where the three parts of a split ring live, as front-end user addresses (SET_VRING_ADDR)."""

    desc: int
    avail: int
    used: int


class Chain:
    """One available descriptor chain: device-readable views, then device-writable views."""

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len


def check_queue_size(size: int) -> None:
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise GuestFault("bad_ring", f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")


class SplitQueue:
    """One split virtqueue of ``size`` entries at ``addrs``; ``last_avail`` is the next avail entry."""

    def __init__(
        self, memory: GuestMemory, size: int, addrs: RingAddresses, *, event_idx: bool, last_avail: int = 0
    ) -> None:
        check_queue_size(size)
        for name, addr, align in (
            ("desc", addrs.desc, 16),
            ("avail", addrs.avail, 2),
            ("used", addrs.used, 4),
        ):
            if addr % align:
                raise GuestFault("bad_ring", f"{name} ring at {addr:#x} is not {align}-byte aligned")
        tail = 2 if event_idx else 0
        self.memory = memory
        self.size = size
        self.addrs = addrs
        self.event_idx = event_idx
        self._mask = size - 1
        self._desc = memory.uva(addrs.desc, 16 * size)
        self._avail = memory.uva(addrs.avail, 4 + 2 * size + tail).cast("H")  # flags, idx, ring, used_event
        self._used = memory.uva(addrs.used, 4 + 8 * size + tail)
        self._used16 = self._used.cast("H")  # flags, idx, ..., avail_event at 2 + 4 * size
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = self._used16[1]
        self._published = self.used_idx
        self._signalled = self.used_idx
        self.broken: str | None = None

    # -- driver -> device -----------------------------------------------------------------------
    def has_available(self) -> bool:
        return self.broken is None and self._avail[1] != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises ChainFault for a bad chain, GuestFault for a bad ring."""
        if self.broken is not None:
            return None
        avail_idx = self._avail[1]
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            self.broken = "avail_overrun"
            raise GuestFault(
                "avail_overrun", f"avail idx {avail_idx} is {pending} ahead of {self.last_avail}"
            )
        head = self._avail[2 + (self.last_avail & self._mask)]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self.walk(head)

    def walk(self, head: int) -> Chain:
        """The chain that starts at descriptor ``head``; ChainFault when it breaks a rule."""
        size = self.size
        if head >= size:
            raise ChainFault("desc_index", f"head {head} >= queue size {size}", None)
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        index = head
        for _ in range(min(size, MAX_CHAIN)):
            addr, length, flags, nxt = DESC.unpack_from(self._desc, 16 * index)
            if flags & DESC_F_INDIRECT:
                raise ChainFault("indirect_desc", f"descriptor {index} is indirect (not negotiated)", head)
            try:
                view = self.memory.gpa(addr, length)
            except GuestFault as fault:
                raise ChainFault(fault.reason, f"descriptor {index}: {fault.detail}", head) from None
            if flags & DESC_F_WRITE:
                writable.append(view)
                wlen += length
            elif writable:
                raise ChainFault("desc_order", f"readable descriptor {index} after a writable one", head)
            else:
                readable.append(view)
                rlen += length
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable, rlen, wlen)
            if nxt >= size:
                raise ChainFault("desc_index", f"descriptor {index} chains to {nxt} >= {size}", head)
            index = nxt
        if size <= MAX_CHAIN:
            raise ChainFault("desc_loop", f"chain from {head} is longer than the queue ({size})", head)
        raise ChainFault("chain_too_long", f"chain from {head} is longer than {MAX_CHAIN} descriptors", head)

    def remapped(self, memory: GuestMemory) -> SplitQueue:
        """This ring over a new memory table, going on from the same indices; GuestFault when the table
        no longer holds it."""
        queue = SplitQueue(
            memory, self.size, self.addrs, event_idx=self.event_idx, last_avail=self.last_avail
        )
        queue.used_idx, queue._published, queue._signalled = self.used_idx, self._published, self._signalled
        return queue

    def arm_kick(self) -> bool:
        """Ask for a kick on the next available buffer; True when buffers arrived meanwhile (drain again)."""
        if self.broken is not None:
            return False
        if self.event_idx:
            self._used16[2 + 4 * self.size] = self.last_avail
            full_barrier()  # the driver sees avail_event before we look at avail.idx again
        return self.has_available()

    # -- device -> driver -----------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written (visible after ``publish``)."""
        USED_ELEM.pack_into(self._used, 4 + 8 * (self.used_idx & self._mask), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make pushed elements visible; True when the driver asked to be interrupted for them."""
        new = self.used_idx
        if new == self._published:
            return False
        self._used16[1] = new  # the used elements before it: stores stay in order on x86-64
        self._published = new
        full_barrier()  # the driver sees used.idx before we read what it asked for (used_event, flags)
        if self.event_idx:
            old = self._signalled
            self._signalled = new
            used_event = self._avail[2 + self.size]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT
