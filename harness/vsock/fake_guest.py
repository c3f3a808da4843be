"""A synthetic guest for testing the switch without a VM: guest RAM, the driver side of the rx/tx split
rings, a small vsock socket layer (listen, connect, credit, shutdown), and a vhost-user front-end that
speaks to the switch the way QEMU does (memfd RAM, kick and call eventfds).

``FakeGuest(cid)`` attaches straight to a ``VsockDevice`` (``attach``) or through vhost-user (``FakeFront``);
``GuestPump`` runs one in a thread, as a guest kernel would.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.vsock import vhost_user as vu
from harness.vsock.device import RX_QUEUE, TX_QUEUE, VsockDevice
from harness.vsock.memory import GuestMemory, MemoryRegion
from harness.vsock.packet import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
)
from harness.vsock.virtqueue import DESC, DESC_F_NEXT, DESC_F_WRITE, USED_ELEM, RingAddresses, SplitQueue

USER_BASE = 0x7F00_0000_0000  # where the fake front-end pretends guest RAM is mapped
GUEST_BUF_ALLOC = 256 * 1024
U32 = 0xFFFFFFFF


class DriverQueue:
    """The driver's half of one split ring laid out at ``base`` in guest RAM."""

    def __init__(self, ram: memoryview, base: int, size: int, event_idx: bool) -> None:
        self.ram = ram
        self.ram16 = ram.cast("H")  # the rings' 16-bit fields, one load or store each (the switch reads them)
        self.size = size
        self.event_idx = event_idx
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.free = deque(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    @property
    def addrs(self) -> RingAddresses:
        return RingAddresses(self.desc, self.avail, self.used)

    def user_addrs(self) -> RingAddresses:
        return RingAddresses(USER_BASE + self.desc, USER_BASE + self.avail, USER_BASE + self.used)

    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Put a chain of (gpa, length, device-writable) buffers on the avail ring; returns its head."""
        ids = [self.free.popleft() for _ in buffers]
        for i, (index, (gpa, length, writable)) in enumerate(zip(ids, buffers, strict=True)):
            last = i == len(ids) - 1
            flags = (0 if last else DESC_F_NEXT) | (DESC_F_WRITE if writable else 0)
            DESC.pack_into(self.ram, self.desc + 16 * index, gpa, length, flags, 0 if last else ids[i + 1])
        head = ids[0]
        self.chains[head] = ids
        self.ram16[(self.avail + 4) // 2 + self.avail_idx % self.size] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram16[(self.avail + 2) // 2] = self.avail_idx
        return head

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (head, written); their descriptors go back to the free list."""
        out = []
        used_idx = self.ram16[(self.used + 2) // 2]
        while self.last_used != used_idx:
            head, written = USED_ELEM.unpack_from(self.ram, self.used + 4 + 8 * (self.last_used % self.size))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self.free.extend(self.chains.pop(head, []))
            out.append((head, written))
        if self.event_idx:  # ask for an interrupt on the next used element
            self.ram16[(self.avail + 4) // 2 + self.size] = self.last_used
        return out


@dataclass
class GuestConn:
    """One stream of the fake guest's socket layer."""

    local_port: int
    peer_cid: int
    peer_port: int
    state: str = "connecting"
    received: bytearray = field(default_factory=bytearray)
    outgoing: bytearray = field(default_factory=bytearray)
    fwd_cnt: int = 0
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    peer_shutdown: int = 0
    shutdown_sent: int = 0
    shutdown_pending: int = 0
    reset: bool = False

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))

    @property
    def eof(self) -> bool:
        return bool(self.peer_shutdown & SHUTDOWN_SEND) or self.reset


class FakeGuest:
    """A guest kernel's vsock as far as the switch can see it, driven by the test."""

    def __init__(
        self,
        cid: int,
        *,
        ram_kib: int = 8192,
        queue_size: int = 128,
        rx_buf: int = 4096,
        max_payload: int = MAX_PAYLOAD,
        split_header: bool = True,
        event_idx: bool = True,
        memfd: bool = False,
        seal: bool = True,
    ) -> None:
        self.cid = cid
        self.size = ram_kib * 1024
        if memfd:
            self.fd: int | None = os.memfd_create("fake-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.fd, self.size)
            if seal:  # as QEMU's memory-backend-memfd does (seal=on)
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, self.size)
            self.ram = memoryview(self._map)
        else:
            self.fd = None
            self._map = None
            self.ram = memoryview(bytearray(self.size))
        self.queue_size = queue_size
        self.event_idx = event_idx
        ring_area = -(-(16 * queue_size + 6 + 2 * queue_size + 4 + 6 + 8 * queue_size) // 4096) * 4096
        self.ring_area = ring_area
        self.rx = DriverQueue(self.ram, 0, queue_size, event_idx)
        self.tx = DriverQueue(self.ram, ring_area, queue_size, event_idx)
        self.rx_buf = rx_buf
        self.split_header = split_header
        per_chain = 2 if split_header else 1
        self._rx_base = 2 * ring_area
        self._rx_slots: dict[int, int] = {}
        self._tx_base = self._rx_base + (HEADER_SIZE + rx_buf) * (queue_size // per_chain)
        self.max_payload = max_payload
        self._tx_slot = HEADER_SIZE + max_payload
        tx_slots = min(queue_size // 2, (self.size - self._tx_base) // self._tx_slot)
        if tx_slots < 1:
            raise ValueError(f"{ram_kib} KiB of RAM is too small for these queues and buffers")
        self._tx_free = deque(range(tx_slots))
        self._tx_slots: dict[int, int] = {}
        self.device: VsockDevice | None = None
        self.front: FakeFront | None = None
        self.listening: set[int] = set()
        self.accepted: deque[GuestConn] = deque()
        self.conns: dict[tuple[int, int, int], GuestConn] = {}
        self.packets: list[Header] = []  # every packet received, in order
        self._next_port = 50000
        self.buf_alloc = GUEST_BUF_ALLOC
        self._control: deque[Header] = deque()
        for i in range(queue_size // per_chain):
            self._post_rx(i)

    # -- wiring ---------------------------------------------------------------------------------
    def memory(self) -> GuestMemory:
        return GuestMemory.synthetic([(MemoryRegion(0, self.size, USER_BASE), self.ram)])

    def attach(self, device: VsockDevice) -> None:
        """Connect straight to a switch device (no vhost-user): synthetic memory, no eventfds."""
        memory = self.memory()
        self.device = device
        device.start_queue(
            RX_QUEUE,
            SplitQueue(memory, self.queue_size, self.rx.user_addrs(), event_idx=self.event_idx),
            None,
        )
        device.start_queue(
            TX_QUEUE,
            SplitQueue(memory, self.queue_size, self.tx.user_addrs(), event_idx=self.event_idx),
            None,
        )

    def _kick(self, index: int) -> None:
        if self.front is not None:
            self.front.kick(index)
        elif self.device is not None:
            self.device.kick(index)

    # -- rings ----------------------------------------------------------------------------------
    def _post_rx(self, slot: int) -> None:
        gpa = self._rx_base + slot * (HEADER_SIZE + self.rx_buf)
        if self.split_header:
            head = self.rx.add([(gpa, HEADER_SIZE, True), (gpa + HEADER_SIZE, self.rx_buf, True)])
        else:
            head = self.rx.add([(gpa, HEADER_SIZE + self.rx_buf, True)])
        self._rx_slots[head] = slot

    def send_control(self, hdr: Header) -> None:
        """Send a packet without payload, queued (like a kernel does) while the tx ring is full."""
        if self._control or not self.send_packet(hdr):
            self._control.append(hdr)

    def _flush_control(self) -> None:
        while self._control and self.send_packet(self._control[0]):
            self._control.popleft()

    def send_packet(self, hdr: Header, payload: bytes = b"") -> bool:
        """Put one packet on the tx ring and kick; False when the ring or the tx buffers are full."""
        self._reclaim_tx()
        if not self._tx_free or len(self.tx.free) < 2:
            return False
        slot = self._tx_free.popleft()
        gpa = self._tx_base + slot * self._tx_slot
        HEADER.pack_into(self.ram, gpa, *hdr)
        self.ram[gpa + HEADER_SIZE : gpa + HEADER_SIZE + len(payload)] = payload
        if self.split_header and payload:
            head = self.tx.add([(gpa, HEADER_SIZE, False), (gpa + HEADER_SIZE, len(payload), False)])
        else:
            head = self.tx.add([(gpa, HEADER_SIZE + len(payload), False)])
        self._tx_slots[head] = slot
        self._kick(TX_QUEUE)
        return True

    def _reclaim_tx(self) -> None:
        for head, _ in self.tx.take_used():
            self._tx_free.append(self._tx_slots.pop(head))

    def receive_packets(self) -> list[tuple[Header, bytes]]:
        """Packets the device wrote into rx buffers since the last call; the buffers are posted again."""
        out = []
        for head, written in self.rx.take_used():
            slot = self._rx_slots.pop(head)
            gpa = self._rx_base + slot * (HEADER_SIZE + self.rx_buf)
            if written >= HEADER_SIZE:
                hdr = Header._make(HEADER.unpack_from(self.ram, gpa))
                out.append((hdr, bytes(self.ram[gpa + HEADER_SIZE : gpa + HEADER_SIZE + hdr.len])))
            self._post_rx(slot)
        if out:
            self._kick(RX_QUEUE)
        return out

    # -- socket layer ---------------------------------------------------------------------------
    def _hdr(self, conn: GuestConn, op: int, flags: int = 0, length: int = 0) -> Header:
        return Header(
            self.cid,
            conn.peer_cid,
            conn.local_port,
            conn.peer_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            self.buf_alloc,
            conn.fwd_cnt,
        )

    def listen(self, port: int) -> None:
        self.listening.add(port)

    def connect(self, cid: int, port: int) -> GuestConn:
        self._next_port += 1
        conn = GuestConn(self._next_port, cid, port)
        self.conns[(conn.local_port, cid, port)] = conn
        self.send_control(self._hdr(conn, OP_REQUEST))
        return conn

    def write(self, conn: GuestConn, data: bytes) -> None:
        conn.outgoing += data
        self._push(conn)

    def shutdown(self, conn: GuestConn, flags: int = SHUTDOWN_SEND) -> None:
        """Shut down after the data already written has gone (as a blocking send() would ensure)."""
        conn.shutdown_sent |= flags
        if conn.outgoing:
            conn.shutdown_pending |= flags
        else:
            self.send_control(self._hdr(conn, OP_SHUTDOWN, flags))

    def close(self, conn: GuestConn) -> None:
        self.shutdown(conn, SHUTDOWN_BOTH)

    def read(self, conn: GuestConn) -> bytes:
        data = bytes(conn.received)
        conn.received.clear()
        conn.fwd_cnt = (conn.fwd_cnt + len(data)) & U32
        if data and conn.state == "established":
            self.send_control(self._hdr(conn, OP_CREDIT_UPDATE))
        return data

    def _push(self, conn: GuestConn) -> None:
        while conn.outgoing and conn.state == "established" and not self._control:
            n = min(len(conn.outgoing), conn.credit(), self.max_payload)
            if n <= 0:
                return
            if not self.send_packet(self._hdr(conn, OP_RW, length=n), bytes(conn.outgoing[:n])):
                return
            del conn.outgoing[:n]
            conn.tx_cnt = (conn.tx_cnt + n) & U32
        if conn.shutdown_pending and not conn.outgoing:
            self.send_control(self._hdr(conn, OP_SHUTDOWN, conn.shutdown_pending))
            conn.shutdown_pending = 0

    def pump(self) -> int:
        """Handle received packets like a guest kernel would; returns how many were handled."""
        self._flush_control()
        packets = self.receive_packets()
        for hdr, payload in packets:
            self.packets.append(hdr)
            self._handle(hdr, payload)
        self._flush_control()
        for conn in list(self.conns.values()):
            self._push(conn)
        return len(packets)

    def _handle(self, hdr: Header, payload: bytes) -> None:
        key = (hdr.dst_port, hdr.src_cid, hdr.src_port)
        conn = self.conns.get(key)
        if hdr.op == OP_REQUEST:
            if conn is None and hdr.dst_port in self.listening:
                conn = GuestConn(
                    hdr.dst_port,
                    hdr.src_cid,
                    hdr.src_port,
                    state="established",
                    peer_buf_alloc=hdr.buf_alloc,
                    peer_fwd_cnt=hdr.fwd_cnt,
                )
                self.conns[key] = conn
                self.accepted.append(conn)
                self.send_control(self._hdr(conn, OP_RESPONSE))
            else:
                self.send_control(
                    Header(self.cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, TYPE_STREAM, OP_RST, 0, 0, 0)
                )
            return
        if conn is None:
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == OP_RESPONSE:
            conn.state = "established"
        elif hdr.op == OP_RW:
            conn.received += payload
        elif hdr.op == OP_RST:
            conn.reset = True
            conn.state = "closed"
        elif hdr.op == OP_SHUTDOWN:
            conn.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH
            if conn.peer_shutdown == SHUTDOWN_BOTH:
                self.send_control(self._hdr(conn, OP_RST))
                conn.state = "closed"
        elif hdr.op == OP_CREDIT_REQUEST:
            self.send_control(self._hdr(conn, OP_CREDIT_UPDATE))

    def find(self, peer_cid: int, peer_port: int) -> GuestConn | None:
        for conn in self.conns.values():
            if (conn.peer_cid, conn.peer_port) == (peer_cid, peer_port):
                return conn
        return None

    def close_ram(self) -> None:
        for ring in (self.rx, self.tx):
            ring.ram16.release()
            ring.ram = ring.ram16 = memoryview(b"")
        self.ram.release()
        if self._map is not None:
            self._map.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class GuestPump:
    """A fake guest run by a background thread, like a guest kernel: it handles its packets each round,
    then runs ``behaviours``; hold ``lock`` to call the guest from another thread."""

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.lock = threading.Lock()
        self.behaviours: list[Callable[[FakeGuest], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                busy = self.guest.pump()
                for behaviour in self.behaviours:
                    behaviour(self.guest)
            if not busy:
                time.sleep(0.0005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if condition():
                    return
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached")
            time.sleep(0.002)


def echo(guest: FakeGuest) -> None:
    """A ``GuestPump`` behaviour: echo every accepted connection; close it once the peer has shut down its
    sending side."""
    for conn in list(guest.accepted):
        data = guest.read(conn)
        if data:
            guest.write(conn, data)
        if conn.eof and not conn.outgoing and not conn.shutdown_sent and not conn.reset:
            guest.close(conn)


class FakeFront:
    """A vhost-user front-end for a ``FakeGuest`` (memfd RAM), speaking like QEMU 7.2 does; blocking."""

    def __init__(self, guest: FakeGuest, path: str, *, enable_rings: bool = True) -> None:
        if guest.fd is None:
            raise ValueError("FakeFront needs FakeGuest(memfd=True)")
        self.guest = guest
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.kick_fds = {i: os.eventfd(0, os.EFD_NONBLOCK) for i in (RX_QUEUE, TX_QUEUE)}
        self.call_fds = {i: os.eventfd(0, os.EFD_NONBLOCK) for i in (RX_QUEUE, TX_QUEUE)}
        self.enable_rings = enable_rings
        guest.front = self

    def request(
        self,
        code: int,
        payload: bytes = b"",
        fds: tuple[int, ...] = (),
        *,
        reply: bool = False,
        need_reply: bool = False,
    ) -> bytes | None:
        flags = vu.FLAG_VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        message = vu.HEADER.pack(code, flags, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([message], ancillary)
        if not (reply or need_reply):
            return None
        got, rflags, size = vu.HEADER.unpack(self._recv(vu.HEADER.size))
        if got != code or not rflags & vu.FLAG_REPLY:
            raise AssertionError(f"reply to {code}: request {got} flags {rflags:#x}")
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            data += chunk
        return data

    def _u64(self, code: int) -> int:
        return vu.U64.unpack(self.request(code, reply=True) or b"")[0]

    def set_mem_table(self, fd: int, size: int) -> int:
        """One region of ``size`` bytes of guest RAM from ``fd``; the back-end's REPLY_ACK status."""
        table = struct.pack("<II", 1, 0) + vu.REGION.pack(0, size, USER_BASE, 0)
        return vu.U64.unpack(self.request(vu.SET_MEM_TABLE, table, (fd,), need_reply=True) or b"")[0]

    def start(self, *, features: int | None = None) -> dict[str, int]:
        """The message sequence QEMU sends from connecting to DRIVER_OK; returns what was negotiated."""
        offered = self._u64(vu.GET_FEATURES)
        protocol = self._u64(vu.GET_PROTOCOL_FEATURES)
        acked = protocol & (vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_CONFIG)
        self.request(vu.SET_PROTOCOL_FEATURES, vu.U64.pack(acked))
        queues = self._u64(vu.GET_QUEUE_NUM)
        self.request(vu.SET_OWNER)
        config = self.request(vu.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 8, 0) + bytes(8), reply=True) or b""
        cid = vu.U64.unpack_from(config, vu.CONFIG_HEAD.size)[0]
        want = offered if features is None else features
        if not self.guest.event_idx:
            want &= ~vu.F_RING_EVENT_IDX
        self.request(vu.SET_FEATURES, vu.U64.pack(want))
        self.set_mem_table(self.guest.fd, self.guest.size)  # type: ignore[arg-type]
        for index, dq in ((RX_QUEUE, self.guest.rx), (TX_QUEUE, self.guest.tx)):
            self.request(vu.SET_VRING_NUM, vu.STATE.pack(index, dq.size))
            self.request(vu.SET_VRING_BASE, vu.STATE.pack(index, 0))
            addrs = dq.user_addrs()
            self.request(vu.SET_VRING_ADDR, vu.ADDR.pack(index, 0, addrs.desc, addrs.used, addrs.avail, 0))
            self.request(vu.SET_VRING_KICK, vu.U64.pack(index), (self.kick_fds[index],))
            self.request(vu.SET_VRING_CALL, vu.U64.pack(index), (self.call_fds[index],))
        if self.enable_rings:
            for index in (RX_QUEUE, TX_QUEUE):
                self.request(vu.SET_VRING_ENABLE, vu.STATE.pack(index, 1))
        self._u64(vu.GET_FEATURES)  # a barrier: every message above has been handled
        return {"features": offered, "protocol": protocol, "queues": queues, "cid": cid}

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kick_fds[index], 1)

    def interrupts(self, index: int) -> int:
        try:
            return os.eventfd_read(self.call_fds[index])
        except BlockingIOError:
            return 0

    def stop(self) -> list[int]:
        """GET_VRING_BASE on both rings, as QEMU does when the guest resets the device."""
        return [
            vu.STATE.unpack(self.request(vu.GET_VRING_BASE, vu.STATE.pack(i, 0), reply=True) or b"")[1]
            for i in (RX_QUEUE, TX_QUEUE)
        ]

    def close(self) -> None:
        self.sock.close()
        for fd in (*self.kick_fds.values(), *self.call_fds.values()):
            os.close(fd)
        self.guest.front = None
