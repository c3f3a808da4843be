"""The vhost-user back-end side of one front-end connection (QEMU's ``vhost-user-vsock-pci``).

Implements the messages QEMU sends to a vsock back-end (QEMU docs/interop/vhost-user.rst): feature and
protocol-feature negotiation, SET_MEM_TABLE (fds mapped with ``GuestMemory.from_fds``), the vring messages
with their kick/call fds (SCM_RIGHTS), SET_VRING_ENABLE, GET_CONFIG (the guest CID) and REPLY_ACK. Messages
are read and answered without blocking the loop, a bounded number per round so one front end cannot starve
the others; a malformed message, or a front end that lets its replies pile up, ends the session, never the
switch.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from harness.vsock.device import RX_QUEUE, VsockDevice
from harness.vsock.errors import GuestFault
from harness.vsock.memory import MAX_REGIONS, GuestMemory, MemoryRegion
from harness.vsock.virtqueue import RingAddresses, SplitQueue, check_queue_size

log = logging.getLogger(__name__)

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
RESET_DEVICE = 34

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

F_VSOCK_STREAM = 1 << 0
F_RING_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_RESET_DEVICE = 1 << 13

OFFERED_PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG | PROTOCOL_F_RESET_DEVICE
NUM_QUEUES = 2  # rx and tx; QEMU keeps the event queue of vhost-user-vsock to itself
VRING_NOFD = 1 << 8
VRING_INDEX_MASK = 0xFF
MAX_PAYLOAD = 4096
MAX_FDS = MAX_REGIONS
READS_PER_ROUND = 64  # socket reads for one front end before the loop serves the others
MAX_PENDING_REPLY = 64 * 1024  # reply bytes a front end may leave unread before its session ends

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
CONFIG_HEAD = struct.Struct("<III")

NAMES = {
    v: k
    for k, v in globals().items()
    if k.isupper() and isinstance(v, int) and k.startswith(("GET_", "SET_", "RESET_"))
}


class ProtocolError(Exception):
    """The front-end sent something malformed: the session ends."""


def offered_features(event_idx: bool = True) -> int:
    return F_VERSION_1 | F_PROTOCOL_FEATURES | F_VSOCK_STREAM | (F_RING_EVENT_IDX if event_idx else 0)


@dataclass
class Vring:
    num: int = 0
    addrs: RingAddresses | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool | None = None  # None: the front never said (QEMU < 8.0 does not); treated as enabled


class VhostUserSession:
    """One connected front-end serving ``device``; ``on_close`` runs once when the session ends."""

    def __init__(
        self,
        sock: socket.socket,
        device: VsockDevice,
        loop: asyncio.AbstractEventLoop,
        *,
        event_idx: bool = True,
        on_close: Callable[[VhostUserSession], None] | None = None,
    ) -> None:
        self.sock = sock
        self.device = device
        self.loop = loop
        self.offered = offered_features(event_idx)
        self.on_close = on_close
        self.features = 0
        self.protocol_features = 0
        self.memory: GuestMemory | None = None
        self.vrings = [Vring() for _ in range(NUM_QUEUES)]
        self.closed = False
        self._head = bytearray()
        self._body = bytearray()
        self._fds: list[int] = []
        self._out = bytearray()
        self._writing = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    # -- framing --------------------------------------------------------------------------------
    def _readable(self) -> None:
        """Read and handle what the front end sent, up to ``READS_PER_ROUND`` reads; the loop calls again
        while more is there, after the other front ends and the rings had their turn."""
        try:
            for _ in range(READS_PER_ROUND):
                if self.closed or not self._read_some():
                    break
        except (OSError, ProtocolError) as exc:
            if not isinstance(exc, ConnectionError):
                log.warning("%s: vhost-user session ends: %s", self.device.name, exc)
            self.close()

    def _read_some(self) -> bool:
        """Read what is there; dispatch a message when complete. False when the socket has no more now."""
        head = self._fill(self._head, HEADER.size, "front-end closed the connection")
        if not head:
            return head is not None  # a part read: go on; nothing there: stop for now
        request, flags, size = HEADER.unpack(self._head)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"request {request} announces a {size}-byte payload")
        body = self._fill(self._body, size, "front-end closed the connection mid-message")
        if not body:
            return body is not None
        body_bytes, fds = bytes(self._body), self._fds
        self._head.clear()
        self._body.clear()
        self._fds = []
        try:
            self._dispatch(request, flags, body_bytes, fds)
        finally:
            for fd in fds:  # handlers take the fds they keep out of the list
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        return True

    def _fill(self, buffer: bytearray, size: int, closed: str) -> bool | None:
        """Read toward ``size`` bytes in ``buffer`` (and the fds that come with them): True when it holds
        them, False when more is to come, None when the socket has nothing now."""
        if len(buffer) >= size:
            return True
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                size - len(buffer), socket.CMSG_SPACE(MAX_FDS * 4)
            )
        except BlockingIOError:
            return None
        self._take_fds(ancdata)
        if not data:
            raise ConnectionResetError(closed)
        buffer += data
        return len(buffer) >= size

    def _take_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise ProtocolError(f"{len(self._fds)} fds in one message")

    def _reply(self, request: int, payload: bytes) -> None:
        """Queue a reply and send what the socket takes now; the rest goes when it is writable."""
        self._out += HEADER.pack(request, FLAG_VERSION | FLAG_REPLY, len(payload)) + payload
        if len(self._out) > MAX_PENDING_REPLY:
            raise ProtocolError(f"the front end leaves {len(self._out)} bytes of replies unread")
        if not self._writing:
            self._send_replies()

    def _send_replies(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if not isinstance(exc, ConnectionError):
                log.warning("%s: vhost-user session ends: %s", self.device.name, exc)
            self.close()
            return
        del self._out[:sent]
        if self._out and not self._writing:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._send_replies)
        elif not self._out and self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    # -- dispatch -------------------------------------------------------------------------------
    def _dispatch(self, request: int, flags: int, body: bytes, fds: list[int]) -> None:
        log.debug(
            "%s: vhost-user %s (%d bytes, %d fds)",
            self.device.name,
            NAMES.get(request, request),
            len(body),
            len(fds),
        )
        handler = self._handlers().get(request)
        if handler is None:
            log.info("%s: vhost-user request %d not supported", self.device.name, request)
            status = 1
            reply = None
        else:
            try:
                reply = handler(body, fds)
                status = 0
            except GuestFault as fault:
                self.device.fault(fault.reason, fault.detail)
                reply, status = None, 1
            except struct.error as exc:
                raise ProtocolError(f"{NAMES.get(request, request)}: malformed payload: {exc}") from exc
        if reply is not None:
            self._reply(request, reply)
        elif flags & FLAG_NEED_REPLY and self.protocol_features & PROTOCOL_F_REPLY_ACK:
            self._reply(request, U64.pack(status))

    def _handlers(self) -> dict[int, Callable[[bytes, list[int]], bytes | None]]:
        return {
            GET_FEATURES: lambda b, f: U64.pack(self.offered),
            SET_FEATURES: self._set_features,
            SET_OWNER: lambda b, f: None,
            RESET_OWNER: lambda b, f: self._reset(),
            RESET_DEVICE: lambda b, f: self._reset(),
            GET_PROTOCOL_FEATURES: lambda b, f: U64.pack(OFFERED_PROTOCOL_FEATURES),
            SET_PROTOCOL_FEATURES: self._set_protocol_features,
            GET_QUEUE_NUM: lambda b, f: U64.pack(NUM_QUEUES),
            SET_MEM_TABLE: self._set_mem_table,
            SET_VRING_NUM: self._set_vring_num,
            SET_VRING_ADDR: self._set_vring_addr,
            SET_VRING_BASE: self._set_vring_base,
            GET_VRING_BASE: self._get_vring_base,
            SET_VRING_KICK: lambda b, f: self._set_vring_fd(b, f, "kick_fd"),
            SET_VRING_CALL: lambda b, f: self._set_vring_fd(b, f, "call_fd"),
            SET_VRING_ERR: lambda b, f: self._set_vring_fd(b, f, "err_fd"),
            SET_VRING_ENABLE: self._set_vring_enable,
            GET_CONFIG: self._get_config,
            SET_CONFIG: lambda b, f: None,
        }

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < NUM_QUEUES:
            raise ProtocolError(f"vring index {index} (the device has {NUM_QUEUES})")
        return self.vrings[index]

    # -- handlers -------------------------------------------------------------------------------
    def _set_features(self, body: bytes, fds: list[int]) -> None:
        (features,) = U64.unpack_from(body)
        if features & ~self.offered:
            raise ProtocolError(f"features {features:#x} include some not offered ({self.offered:#x})")
        self.features = features

    def _set_protocol_features(self, body: bytes, fds: list[int]) -> None:
        (features,) = U64.unpack_from(body)
        self.protocol_features = features & OFFERED_PROTOCOL_FEATURES

    def _set_mem_table(self, body: bytes, fds: list[int]) -> None:
        (count,) = struct.unpack_from("<I", body)
        if not 0 < count <= MAX_REGIONS or len(body) < 8 + REGION.size * count:
            raise ProtocolError(f"memory table of {count} regions in {len(body)} bytes")
        regions = [MemoryRegion(*REGION.unpack_from(body, 8 + REGION.size * i)) for i in range(count)]
        memory = GuestMemory.from_fds(regions, fds)  # the fds are closed after dispatch; the maps stay
        try:  # every running ring over the new table, or none: a table that leaves one out is refused
            queues = {index: queue.remapped(memory) for index, queue in self.device.queues.items()}
        except GuestFault:
            memory.close()
            raise
        old, self.memory = self.memory, memory
        for index, queue in queues.items():
            self.device.remap_queue(index, queue)
        if old is not None:
            old.close()
        log.debug(
            "%s: memory table %s",
            self.device.name,
            [(hex(r.guest_addr), hex(r.size)) for r in memory.regions],
        )

    def _set_vring_num(self, body: bytes, fds: list[int]) -> None:
        index, num = STATE.unpack_from(body)
        check_queue_size(num)
        self._vring(index).num = num

    def _set_vring_addr(self, body: bytes, fds: list[int]) -> None:
        index, _flags, desc, used, avail, _log = ADDR.unpack_from(body)
        self._vring(index).addrs = RingAddresses(desc=desc, avail=avail, used=used)

    def _set_vring_base(self, body: bytes, fds: list[int]) -> None:
        index, base = STATE.unpack_from(body)
        self._vring(index).base = base & 0xFFFF

    def _get_vring_base(self, body: bytes, fds: list[int]) -> bytes:
        index, _ = STATE.unpack_from(body)
        vring = self._vring(index)
        queue = self.device.queues.get(index)
        base = queue.last_avail if queue is not None else vring.base
        self._stop(index)
        vring.base = base
        return STATE.pack(index, base)

    def _set_vring_fd(self, body: bytes, fds: list[int], which: str) -> None:
        (value,) = U64.unpack_from(body)
        vring = self._vring(value & VRING_INDEX_MASK)
        fd = None
        if not value & VRING_NOFD:
            if len(fds) != 1:
                raise ProtocolError(f"{which} for vring {value & VRING_INDEX_MASK} came with {len(fds)} fds")
            fd = fds.pop()
            os.set_blocking(fd, False)
        index = value & VRING_INDEX_MASK
        if which == "kick_fd":
            self._stop(index)
        old = getattr(vring, which)
        setattr(vring, which, fd)
        if which == "call_fd":
            self.device.set_call_fd(index, fd)
        if old is not None:
            os.close(old)
        if which == "kick_fd" and fd is not None:
            self._start(index)

    def _set_vring_enable(self, body: bytes, fds: list[int]) -> None:
        index, enable = STATE.unpack_from(body)
        vring = self._vring(index)
        vring.enabled = bool(enable)
        if index == RX_QUEUE:
            self.device.rx_enabled = bool(enable)
        if enable and index in self.device.queues:
            self.device.kick(index)

    def _get_config(self, body: bytes, fds: list[int]) -> bytes:
        offset, size, flags = CONFIG_HEAD.unpack_from(body)
        config = U64.pack(self.device.cid)
        if size > 256 or offset > len(config):
            return CONFIG_HEAD.pack(offset, 0, flags)
        data = config[offset : offset + size].ljust(size, b"\0")
        return CONFIG_HEAD.pack(offset, size, flags) + data

    # -- rings ----------------------------------------------------------------------------------
    def _start(self, index: int) -> None:
        vring = self.vrings[index]
        if self.memory is None or vring.addrs is None or not vring.num or vring.kick_fd is None:
            raise ProtocolError(f"vring {index} kicked before its memory, size and addresses were set")
        queue = SplitQueue(
            self.memory,
            vring.num,
            vring.addrs,
            event_idx=bool(self.features & F_RING_EVENT_IDX),
            last_avail=vring.base,
        )
        self.device.start_queue(index, queue, vring.call_fd)
        if index == RX_QUEUE:
            self.device.rx_enabled = vring.enabled is not False
        self.loop.add_reader(vring.kick_fd, self._kicked, index)

    def _stop(self, index: int) -> None:
        vring = self.vrings[index]
        if vring.kick_fd is not None:
            self.loop.remove_reader(vring.kick_fd)
        self.device.stop_queue(index)

    def _kicked(self, index: int) -> None:
        vring = self.vrings[index]
        if vring.kick_fd is None:
            return
        try:
            os.read(vring.kick_fd, 8)
        except BlockingIOError:
            pass
        except OSError:
            self.loop.remove_reader(vring.kick_fd)
            return
        if index in self.device.queues and vring.enabled is not False:
            self.device.kick(index)

    def _reset(self) -> None:
        for index in range(NUM_QUEUES):
            self._stop(index)
        self.device.reset("front-end reset")

    # -- end ------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())
        for index, vring in enumerate(self.vrings):
            self._stop(index)
            for which in ("kick_fd", "call_fd", "err_fd"):
                fd = getattr(vring, which)
                if fd is not None:
                    setattr(vring, which, None)
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.device.set_call_fd(index, None)
        self.device.reset("front-end gone")
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self.sock.close()
        if self.on_close is not None:
            self.on_close(self)
