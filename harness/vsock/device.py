"""One VM's virtio-vsock device in the switch: its tx ring feeds a router, its rx ring is filled from a
bounded backlog of packets and from sources (host connections) that write straight into rx buffers.

Work is batched: a kick drains up to ``BATCH`` chains, the used index is published once and the call
eventfd is signalled once per batch. A fault in one chain is counted and the chain returned empty; a fault
in a ring marks the device broken, and the router resets what the VM owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from harness.vsock.errors import GuestFault
from harness.vsock.packet import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    OP_RST,
    OP_RW,
    TYPE_STREAM,
    Header,
)
from harness.vsock.virtqueue import Chain, ChainFault, SplitQueue

log = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
BATCH = 128  # chains per round before yielding to the loop
MAX_BACKLOG_PACKETS = 4096  # packets waiting for this VM's rx buffers
MAX_BACKLOG_BYTES = 32 * 1024 * 1024
SENDER_SHARE = 4  # one sender (a source CID) may fill at most 1/SENDER_SHARE of the backlog
_EVENTFD_ONE = (1).to_bytes(8, "little")


class Router(Protocol):
    def route(self, vm: VsockDevice, hdr: Header, payload: list[memoryview]) -> None: ...

    def device_broken(self, vm: VsockDevice, reason: str) -> None: ...


class RxSource(Protocol):
    """Something with data for the VM (a host connection); ``fill`` writes one packet into ``chain``."""

    def fill(self, vm: VsockDevice, chain: Chain) -> int:
        """Bytes written into ``chain`` (header included); 0 when it has nothing now (it re-arms itself)."""
        ...


class VsockDevice:
    """The switch's side of one VM: CID, rings, rx backlog, drop counters."""

    def __init__(
        self,
        name: str,
        cid: int,
        router: Router,
        loop: asyncio.AbstractEventLoop,
        drops: Counter[str] | None = None,
    ) -> None:
        self.name = name
        self.cid = cid
        self.router = router
        self.loop = loop
        self.drops: Counter[str] = drops if drops is not None else Counter()
        self.queues: dict[int, SplitQueue] = {}
        self.call_fds: dict[int, int] = {}
        self.rx_enabled = True
        self.broken: str | None = None
        self.backlog: deque[list] = deque()  # [header, payload, offset]
        self.backlog_bytes = 0
        self.sender_packets = Counter[int]()  # backlog entries and bytes by source CID
        self.sender_bytes = Counter[int]()
        self.sources: deque[RxSource] = deque()
        self._rx_chain: Chain | None = None
        self._flush_scheduled = False
        self._tx_scheduled = False
        self.on_reset: list[Callable[[VsockDevice], None]] = []
        self.stats = Counter[str]()

    # -- rings ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.broken is None and RX_QUEUE in self.queues and TX_QUEUE in self.queues

    def start_queue(self, index: int, queue: SplitQueue, call_fd: int | None) -> None:
        if not self.queues:
            self.broken = None  # the driver set its rings up afresh (a reboot or a driver reload)
        self.queues[index] = queue
        if call_fd is not None:
            self.call_fds[index] = call_fd
        if index == RX_QUEUE:
            self._rx_chain = None
        if self.running:
            self.kick(TX_QUEUE)
            self.schedule_flush()

    def remap_queue(self, index: int, queue: SplitQueue) -> None:
        """Go on with ``queue``, the same ring over a new memory table; an rx chain taken but not filled yet
        is walked again there, or returned empty when it no longer fits."""
        self.queues[index] = queue
        if index == RX_QUEUE and self._rx_chain is not None:
            head, self._rx_chain = self._rx_chain.head, None
            try:
                self._rx_chain = queue.walk(head)
            except GuestFault:
                queue.push(head, 0)

    def set_call_fd(self, index: int, fd: int | None) -> None:
        if fd is None:
            self.call_fds.pop(index, None)
        else:
            self.call_fds[index] = fd

    def stop_queue(self, index: int) -> None:
        """The front stopped a ring (guest reset or shutdown): every connection of this VM ends."""
        if self.queues.pop(index, None) is not None:
            self.reset("ring stopped")

    def reset(self, why: str) -> None:
        """Forget all packets and connections of this VM (its guest kernel forgot them too)."""
        log.debug("%s: reset (%s)", self.name, why)
        self.backlog.clear()
        self.backlog_bytes = 0
        self.sender_packets.clear()
        self.sender_bytes.clear()
        self.sources.clear()
        self._rx_chain = None
        for hook in list(self.on_reset):
            hook(self)

    def fault(self, reason: str, detail: str) -> None:
        """Count a guest fault; log the first of each kind per VM."""
        self.drops[reason] += 1
        if self.drops[reason] == 1:
            log.warning("%s (cid %d): dropped: %s: %s", self.name, self.cid, reason, detail)

    def break_device(self, reason: str, detail: str) -> None:
        self.fault(reason, detail)
        if self.broken is None:
            self.broken = reason
            self.router.device_broken(self, reason)

    def _signal(self, index: int) -> None:
        fd = self.call_fds.get(index)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, _EVENTFD_ONE)

    # -- tx: guest -> switch --------------------------------------------------------------------
    def kick(self, index: int) -> None:
        if index == TX_QUEUE:
            self.process_tx()
        elif index == RX_QUEUE:
            self.flush_rx()

    def process_tx(self) -> None:
        self._tx_scheduled = False
        tx = self.queues.get(TX_QUEUE)
        if tx is None or self.broken is not None:
            return
        done = 0  # chains taken, bad ones too: a guest cannot hold the loop with a stream of bad chains
        while done < BATCH:
            taken = self._take_tx(tx)
            if taken is None:  # the guest broke the device
                return
            if not taken:
                break
            done += 1
        if tx.publish():
            self._signal(TX_QUEUE)
        if done >= BATCH and not self._tx_scheduled:
            self._tx_scheduled = True
            self.loop.call_soon(self.process_tx)

    def _take_tx(self, tx: SplitQueue) -> bool | None:
        """Handle the next tx chain: True when one was taken (a bad one too), False when the ring is empty,
        None when the guest broke the device."""
        while True:
            try:
                chain = tx.pop()
            except ChainFault as fault:
                self.fault(fault.reason, fault.detail)
                if fault.head is not None:
                    tx.push(fault.head, 0)
                return True
            except GuestFault as fault:
                self.break_device(fault.reason, fault.detail)
                return None
            if chain is not None:
                break
            if not tx.arm_kick():
                return False
        try:
            self._handle_tx(chain)
        except GuestFault as fault:
            self.fault(fault.reason, fault.detail)
        tx.push(chain.head, 0)
        return True

    def _handle_tx(self, chain: Chain) -> None:
        if chain.readable_len < HEADER_SIZE:
            raise GuestFault("short_header", f"tx chain of {chain.readable_len} bytes")
        first = chain.readable[0]
        raw = first if len(first) >= HEADER_SIZE else _gather_header(chain.readable)
        hdr = Header._make(HEADER.unpack_from(raw))
        if hdr.len > MAX_PAYLOAD:
            raise GuestFault("oversize", f"{hdr.describe()} exceeds {MAX_PAYLOAD} bytes")
        if hdr.len > chain.readable_len - HEADER_SIZE:
            raise GuestFault("bad_len", f"{hdr.describe()} but the chain holds {chain.readable_len} bytes")
        if hdr.src_cid != self.cid:
            raise GuestFault("forged_src_cid", f"{hdr.describe()} from a VM whose CID is {self.cid}")
        if hdr.type != TYPE_STREAM:
            self.fault("unknown_type", f"type {hdr.type} in {hdr.describe()}")
            if hdr.op != OP_RST:
                self.enqueue(hdr.reply(OP_RST))
            return
        self.stats["tx_packets"] += 1
        self.router.route(self, hdr, _payload(chain.readable, hdr.len) if hdr.len else [])

    # -- rx: switch -> guest --------------------------------------------------------------------
    def enqueue(self, hdr: Header, payload: bytes | memoryview = b"") -> bool:
        """Queue a packet for this VM (payload is copied); False when the backlog, or this sender's share
        of it, is full (dropped). Data right behind data of the same flow joins it, so many small writes
        take bytes, not packet slots."""
        size = len(payload)
        last = self.backlog[-1] if self.backlog else None
        joins = last is not None and _joins(last, hdr, size)
        sender = hdr.src_cid
        full = not joins and (
            len(self.backlog) >= MAX_BACKLOG_PACKETS
            or self.sender_packets[sender] >= MAX_BACKLOG_PACKETS // SENDER_SHARE
        )
        if (
            full
            or self.backlog_bytes + size > MAX_BACKLOG_BYTES
            or self.sender_bytes[sender] + size > MAX_BACKLOG_BYTES // SENDER_SHARE
        ):
            self.fault("rx_backlog_full", f"{hdr.describe()} to a VM that posts no rx buffers")
            return False
        if joins:
            last[0] = hdr  # the newest credit fields; the length is set as the data is written
            last[1] += payload
        else:
            self.backlog.append([hdr, bytearray(payload) if size else b"", 0])
            self.sender_packets[sender] += 1
        self.backlog_bytes += size
        self.sender_bytes[sender] += size
        self.schedule_flush()
        return True

    def deliver(self, hdr: Header, payload: list[memoryview]) -> bool:
        """Forward a packet now where rx buffers allow (splitting data to their size), queue the rest."""
        if not self.backlog and self.running and self.rx_enabled:
            rx = self.queues[RX_QUEUE]
            data = payload[0] if len(payload) == 1 else memoryview(b"".join(payload))
            offset = 0
            total = len(data)
            while True:
                chain = self._next_rx_chain(rx)
                if chain is None:
                    break
                written, offset = _write_packet(chain, hdr, data, offset)
                rx.push(chain.head, written)
                self._rx_chain = None
                if offset >= total:
                    if rx.publish():
                        self._signal(RX_QUEUE)
                    return True
            if rx.publish():
                self._signal(RX_QUEUE)
            hdr = hdr._replace(len=total - offset)
            return self.enqueue(hdr, data[offset:])
        return self.enqueue(hdr, b"".join(payload) if len(payload) != 1 else payload[0])

    def want_rx(self, source: RxSource) -> None:
        """``source`` has data: it is called to ``fill`` rx buffers until it says it has none."""
        if source not in self.sources:
            self.sources.append(source)
        self.schedule_flush()

    def drop_source(self, source: RxSource) -> None:
        with contextlib.suppress(ValueError):
            self.sources.remove(source)

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_rx)

    def _next_rx_chain(self, rx: SplitQueue) -> Chain | None:
        """The rx chain to fill next; None when none is posted, or after a batch of bad ones (the flush
        goes on in the next round, so a guest posting only bad buffers cannot hold the loop)."""
        bad = 0
        while self._rx_chain is None:
            if bad >= BATCH:
                self.schedule_flush()
                return None
            try:
                chain = rx.pop()
            except ChainFault as fault:
                self.fault(fault.reason, fault.detail)
                if fault.head is not None:
                    rx.push(fault.head, 0)
                bad += 1
                continue
            except GuestFault as fault:
                self.break_device(fault.reason, fault.detail)
                return None
            if chain is None:
                if rx.arm_kick():
                    continue
                return None
            if chain.readable or chain.writable_len < HEADER_SIZE:
                self.fault(
                    "bad_rx_buffer",
                    f"rx chain {chain.head}: {chain.writable_len} writable bytes, "
                    f"{len(chain.readable)} readable descriptors",
                )
                rx.push(chain.head, 0)
                bad += 1
                continue
            self._rx_chain = chain
        return self._rx_chain

    def flush_rx(self) -> None:
        self._flush_scheduled = False
        if not self.running or not self.rx_enabled:
            return
        rx = self.queues[RX_QUEUE]
        budget = BATCH
        while budget and (self.backlog or self.sources):
            chain = self._next_rx_chain(rx)
            if chain is None:
                break
            if self.backlog:
                entry = self.backlog[0]
                hdr, payload, offset = entry
                written, new_offset = _write_packet(chain, hdr, payload, offset)
                done = new_offset >= len(payload)
                if done:
                    self.backlog.popleft()
                else:
                    entry[2] = new_offset
                self._dequeued(hdr.src_cid, int(done), new_offset - offset)
            else:
                source = self.sources[0]
                written = source.fill(self, chain)
                if not written:
                    if self.sources and self.sources[0] is source:
                        self.sources.popleft()
                    continue
                self.sources.rotate(-1)
            rx.push(chain.head, written)
            self._rx_chain = None
            budget -= 1
        if rx.publish():
            self._signal(RX_QUEUE)
        if not budget:
            self.schedule_flush()

    def _dequeued(self, sender: int, packets: int, nbytes: int) -> None:
        self.backlog_bytes -= nbytes
        self.sender_packets[sender] -= packets
        self.sender_bytes[sender] -= nbytes
        if not self.sender_packets[sender]:  # forget senders with nothing queued: the counters stay small
            del self.sender_packets[sender]
            self.sender_bytes.pop(sender, None)


def _joins(entry: list, hdr: Header, size: int) -> bool:
    """Whether ``size`` bytes of data (``hdr``) can join backlog ``entry``: data of the same flow, none of
    it written yet (so no written part is kept while the entry grows)."""
    queued, payload, offset = entry
    return bool(
        size and payload and offset == 0 and hdr.op == OP_RW and queued.op == OP_RW and hdr[:4] == queued[:4]
    )


def _gather_header(views: list[memoryview]) -> bytes:
    """The first ``HEADER_SIZE`` bytes of a chain split over several descriptors; only those are copied,
    however large the descriptors after them are."""
    raw = bytearray()
    for view in views:
        raw += view[: HEADER_SIZE - len(raw)]
        if len(raw) >= HEADER_SIZE:
            break
    return bytes(raw)


def _payload(views: list[memoryview], length: int) -> list[memoryview]:
    """The ``length`` payload bytes after the header, as views into the chain."""
    out = []
    skip = HEADER_SIZE
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        part = view[skip : skip + length]
        skip = 0
        out.append(part)
        length -= len(part)
        if length <= 0:
            break
    return out


def payload_views(chain: Chain, length: int) -> list[memoryview]:
    """Writable views for ``length`` payload bytes after the header in rx ``chain``."""
    return _payload(chain.writable, length)


def write_header(chain: Chain, hdr: Header) -> None:
    first = chain.writable[0]
    if len(first) >= HEADER_SIZE:
        HEADER.pack_into(first, 0, *hdr)
    else:
        _scatter(chain.writable, 0, HEADER.pack(*hdr))


def _scatter(views: list[memoryview], skip: int, data: bytes | memoryview) -> None:
    pos = 0
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        n = min(len(view) - skip, len(data) - pos)
        view[skip : skip + n] = data[pos : pos + n]
        pos += n
        skip = 0
        if pos >= len(data):
            return


def _write_packet(chain: Chain, hdr: Header, payload: bytes | memoryview, offset: int) -> tuple[int, int]:
    """Write ``hdr`` and as much of ``payload[offset:]`` as fits; returns (bytes written, new offset)."""
    n = min(chain.writable_len - HEADER_SIZE, len(payload) - offset)
    if n != hdr.len:
        hdr = hdr._replace(len=n)
    first = chain.writable[0]
    if len(first) >= HEADER_SIZE + n:
        HEADER.pack_into(first, 0, *hdr)
        if n:
            first[HEADER_SIZE : HEADER_SIZE + n] = payload[offset : offset + n]
    else:
        write_header(chain, hdr)
        if n:
            _scatter(chain.writable, HEADER_SIZE, payload[offset : offset + n])
    return HEADER_SIZE + n, offset + n
