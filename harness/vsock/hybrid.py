"""The host end of a VM's vsock in the hybrid convention (Firecracker, rust-vmm vhost-device-vsock).

The host connects to the VM's Unix socket and writes ``CONNECT <port>\\n``; once the guest accepts, the
switch answers ``OK <host_port>\\n`` and the socket carries the stream. A guest connecting to CID 2 port P
reaches a listener at ``<uds>_<P>``. Each such stream is one ``HostConnection``: the switch is the vsock
peer of the guest, with its own receive buffer (``buf_alloc``/``fwd_cnt``) and the guest's credit.

A VM's host connections are bounded twice: the bytes they hold for host sockets that do not read
(``MAX_HOST_BUFFER``, all connections of the VM together) and their number (``ConnectionBudget``: a share of
the descriptors the process may open, less a reserve so other VMs can still be set up).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import resource
import socket
from pathlib import Path

from harness.vsock.device import VsockDevice, payload_views, write_header
from harness.vsock.errors import GuestFault
from harness.vsock.packet import (
    HEADER_SIZE,
    HOST_CID,
    MAX_PAYLOAD,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_RECEIVE,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
)
from harness.vsock.virtqueue import Chain

log = logging.getLogger(__name__)

HOST_BUF_ALLOC = 512 * 1024  # what the switch offers the guest per host connection
CREDIT_UPDATE_STEP = HOST_BUF_ALLOC // 4  # advertise fwd_cnt again after this many bytes forwarded
CONNECT_TIMEOUT = 5.0  # seconds the guest has to answer a host CONNECT
CONNECT_LINE_MAX = 64
FIRST_HOST_PORT = 1 << 30  # host-side ports of host-initiated connections, as Firecracker numbers them
MAX_HOST_CONNECTIONS = 1024  # open host connections per VM, at most (each holds one descriptor)
MAX_HOST_BUFFER = 8 * 1024 * 1024  # bytes a VM's host connections together hold for host sockets
FD_RESERVE = 256  # descriptors kept free of host connections: vhost-user sessions, their fds, listeners
U32 = 0xFFFFFFFF

CONNECTING = "connecting"
ESTABLISHED = "established"
CLOSED = "closed"


def listener_path(uds: Path, port: int) -> Path:
    """Where a host listener for guest connections to CID 2 ``port`` lives."""
    return uds.with_name(f"{uds.name}_{port}")


class ConnectionBudget:
    """The host connections of all VMs of one switch: each VM may open at most an equal share of the
    descriptors the process may open less ``FD_RESERVE``, and at most ``MAX_HOST_CONNECTIONS``."""

    def __init__(self) -> None:
        self.sides: list[HostSide] = []

    def pool(self) -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(0, (soft if soft != resource.RLIM_INFINITY else 1 << 20) - FD_RESERVE)

    def refusal(self, side: HostSide) -> str | None:
        """Why ``side`` may not open one more host connection now; None when it may."""
        pool = self.pool()
        share = min(MAX_HOST_CONNECTIONS, pool // max(1, len(self.sides)))
        if len(side.connections) >= share:
            return f"{len(side.connections)} host connections, its share of {share}"
        if sum(len(s.connections) for s in self.sides) >= pool:
            return f"the switch's {pool} descriptors for host connections are in use"
        return None


class HostConnection:
    """One stream between a guest port and a host Unix socket; the switch terminates the vsock protocol."""

    def __init__(self, side: HostSide, sock: socket.socket, host_port: int, guest_port: int, state: str):
        self.side = side
        self.vm = side.vm
        self.sock = sock
        self.host_port = host_port
        self.guest_port = guest_port
        self.state = state
        self.key = (host_port, guest_port)
        # the switch as receiver (guest -> host)
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.fwd_adv = 0
        self.out = bytearray()
        # the guest as receiver (host -> guest)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.peer_shutdown = 0  # SHUTDOWN flags the guest sent
        self.host_eof = False  # the host side sent EOF; SHUTDOWN(SEND) went to the guest
        self._reading = False
        self._writing = False
        self._credit_requested = False
        self._timer: asyncio.TimerHandle | None = None

    # -- packets to the guest -------------------------------------------------------------------
    def header(self, op: int, *, flags: int = 0, length: int = 0) -> Header:
        self.fwd_adv = self.fwd_cnt
        return Header(
            HOST_CID,
            self.vm.cid,
            self.host_port,
            self.guest_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            HOST_BUF_ALLOC,
            self.fwd_cnt,
        )

    def send(self, op: int, flags: int = 0) -> None:
        self.vm.enqueue(self.header(op, flags=flags))

    def credit(self) -> int:
        used = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - used)

    def fill(self, vm: VsockDevice, chain: Chain) -> int:
        """Read from the host socket straight into one rx buffer of the guest."""
        if self.state != ESTABLISHED or self.peer_shutdown & SHUTDOWN_RECEIVE or self.host_eof:
            return 0
        room = min(chain.writable_len - HEADER_SIZE, self.credit(), MAX_PAYLOAD)
        if room <= 0:
            if not self._credit_requested:
                self._credit_requested = True
                self.send(OP_CREDIT_REQUEST)
            return 0
        views = payload_views(chain, room)
        try:
            n = self.sock.recv_into(views[0]) if len(views) == 1 else self.sock.recvmsg_into(views)[0]
        except BlockingIOError:
            self._arm_reader()
            return 0
        except OSError:
            n = 0
        if n == 0:
            self._host_eof()
            return 0
        self.tx_cnt = (self.tx_cnt + n) & U32
        write_header(chain, self.header(OP_RW, length=n))
        self.vm.stats["host_to_guest_bytes"] += n
        return HEADER_SIZE + n

    def _arm_reader(self) -> None:
        if not self._reading and self.state == ESTABLISHED:
            self._reading = True
            self.side.loop.add_reader(self.sock.fileno(), self._readable)

    def _disarm_reader(self) -> None:
        if self._reading:
            self._reading = False
            self.side.loop.remove_reader(self.sock.fileno())

    def _readable(self) -> None:
        self._disarm_reader()
        self.vm.want_rx(self)

    def _host_eof(self) -> None:
        self._disarm_reader()
        if self.host_eof:
            return
        self.host_eof = True
        self.send(OP_SHUTDOWN, SHUTDOWN_SEND)
        self._maybe_finish()

    # -- packets from the guest -----------------------------------------------------------------
    def from_guest(self, hdr: Header, payload: list[memoryview]) -> None:
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        op = hdr.op
        if op == OP_RW:
            self._data(hdr, payload)
        elif op == OP_RESPONSE:
            if self.state != CONNECTING:
                raise GuestFault("unexpected_response", hdr.describe())
            self._established()
        elif op == OP_CREDIT_UPDATE:
            self._credit_requested = False
            if self.credit() > 0:
                self.vm.want_rx(self)
        elif op == OP_CREDIT_REQUEST:
            self.send(OP_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            self._peer_shutdown(hdr.flags)
        elif op == OP_RST:
            self.close(reset_guest=False)
        elif op == OP_REQUEST:
            raise GuestFault("duplicate_request", hdr.describe())
        else:
            raise GuestFault("unknown_op", hdr.describe())

    def _established(self) -> None:
        self.state = ESTABLISHED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write(f"OK {self.host_port}\n".encode())
        self._arm_reader()

    def _data(self, hdr: Header, payload: list[memoryview]) -> None:
        if self.state != ESTABLISHED:
            raise GuestFault("rw_not_established", hdr.describe())
        if hdr.len > HOST_BUF_ALLOC - ((self.rx_cnt - self.fwd_adv) & U32):
            raise GuestFault("credit_violation", f"{hdr.describe()} beyond the {HOST_BUF_ALLOC}-byte window")
        if self.peer_shutdown & SHUTDOWN_SEND:
            raise GuestFault("rw_after_shutdown", hdr.describe())
        self.rx_cnt = (self.rx_cnt + hdr.len) & U32
        self.vm.stats["guest_to_host_bytes"] += hdr.len
        sent = 0
        if not self.out:  # nothing queued ahead of it: straight to the host socket
            try:
                sent = self.sock.sendmsg(payload) if len(payload) > 1 else self.sock.send(payload[0])
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close(reset_guest=True)
                return
            self._forwarded(sent)
        if sent < hdr.len:
            self._queue_for_host(hdr, payload, sent)

    def _queue_for_host(self, hdr: Header, payload: list[memoryview], sent: int) -> None:
        """Keep what the host socket did not take, within the VM's bound on unread host bytes."""
        if self.side.buffered + hdr.len - sent > MAX_HOST_BUFFER:
            raise GuestFault(
                "host_buffer_full",
                f"{hdr.describe()}: the VM's host sockets already hold {self.side.buffered} unread bytes",
            )
        skip = sent
        for view in payload:
            if skip >= len(view):
                skip -= len(view)
                continue
            self.out += view[skip:]
            skip = 0
        self.side.buffered += hdr.len - sent
        self._arm_writer()

    def _forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & U32
        pending = (self.rx_cnt - self.fwd_adv) & U32
        if (self.fwd_cnt - self.fwd_adv) & U32 >= CREDIT_UPDATE_STEP or (
            pending >= HOST_BUF_ALLOC - MAX_PAYLOAD and self.fwd_cnt != self.fwd_adv
        ):
            self.send(OP_CREDIT_UPDATE)

    def _write(self, data: bytes) -> None:
        """Write switch-made bytes (the OK line) ahead of any stream data."""
        if self.out:
            self.out[:0] = data
            self.side.buffered += len(data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(reset_guest=True)
            return
        if sent < len(data):
            self.out += data[sent:]
            self.side.buffered += len(data) - sent
            self._arm_writer()

    def _arm_writer(self) -> None:
        if not self._writing:
            self._writing = True
            self.side.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.close(reset_guest=True)
            return
        del self.out[:sent]
        self.side.buffered -= sent
        if self.state == ESTABLISHED:
            self._forwarded(sent)
        if not self.out:
            self._writing = False
            self.side.loop.remove_writer(self.sock.fileno())
            self._maybe_finish()

    def _peer_shutdown(self, flags: int) -> None:
        self.peer_shutdown |= flags & SHUTDOWN_BOTH
        if self.peer_shutdown & SHUTDOWN_RECEIVE:
            self._disarm_reader()
            self.vm.drop_source(self)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Half-close the host socket once the guest sent all it will; end the stream when both are done."""
        if self.state == CLOSED or self.out:
            return
        if self.peer_shutdown & SHUTDOWN_SEND:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        guest_done = self.peer_shutdown == SHUTDOWN_BOTH
        both_done = self.peer_shutdown & SHUTDOWN_SEND and (
            self.host_eof or self.peer_shutdown & SHUTDOWN_RECEIVE
        )
        if guest_done or both_done:
            self.close(reset_guest=True)

    # -- end ------------------------------------------------------------------------------------
    def connect_timed_out(self) -> None:
        self._timer = None
        if self.state == CONNECTING:
            log.info("%s: guest did not answer CONNECT %d", self.vm.name, self.guest_port)
            self.close(reset_guest=True)

    def close(self, *, reset_guest: bool) -> None:
        if self.state == CLOSED:
            return
        if reset_guest and self.vm.running:
            self.send(OP_RST)
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._disarm_reader()
        if self._writing:
            self._writing = False
            self.side.loop.remove_writer(self.sock.fileno())
        self.vm.drop_source(self)
        self.side.buffered -= len(self.out)
        self.out.clear()
        self.sock.close()
        self.side.forget(self)


class HostSide:
    """A VM's host endpoints: its listening Unix socket (``uds``) and its open host connections. Without
    ``host_connects`` (an enclave) host programs cannot connect to the guest: each CONNECT is closed."""

    def __init__(
        self,
        vm: VsockDevice,
        uds: Path,
        loop: asyncio.AbstractEventLoop,
        budget: ConnectionBudget | None = None,
        *,
        host_connects: bool = True,
    ) -> None:
        self.vm = vm
        self.host_connects = host_connects
        self.uds = uds
        self.loop = loop
        self.budget = budget or ConnectionBudget()
        self.budget.sides.append(self)
        self.connections: dict[tuple[int, int], HostConnection] = {}
        self.buffered = 0  # bytes all connections hold for their host sockets
        self._ports = itertools.count(FIRST_HOST_PORT)
        self._handshakes: set[asyncio.Task[None]] = set()

    # -- guest -> host --------------------------------------------------------------------------
    def from_guest(self, hdr: Header, payload: list[memoryview]) -> None:
        conn = self.connections.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op == OP_REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != OP_RST:
                self.vm.enqueue(hdr.reply(OP_RST))
            return
        try:
            conn.from_guest(hdr, payload)
        except GuestFault as fault:
            self.vm.fault(fault.reason, fault.detail)
            conn.close(reset_guest=True)

    def _guest_connect(self, hdr: Header) -> None:
        refusal = self.budget.refusal(self)
        if refusal is not None:
            self.vm.fault("too_many_flows", f"{hdr.describe()}: {refusal}")
            self.vm.enqueue(hdr.reply(OP_RST))
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: refuse this one, keep serving the others
            log.warning("%s: no socket for a guest connection: %s", self.vm.name, exc)
            self._refuse(hdr)
            return
        sock.setblocking(False)
        try:
            sock.connect(str(listener_path(self.uds, hdr.dst_port)))
        except OSError:
            sock.close()
            self._refuse(hdr)
            return
        conn = HostConnection(self, sock, hdr.dst_port, hdr.src_port, ESTABLISHED)
        conn.peer_buf_alloc = hdr.buf_alloc
        conn.peer_fwd_cnt = hdr.fwd_cnt
        self.connections[conn.key] = conn
        self.vm.stats["guest_connects"] += 1
        conn.send(OP_RESPONSE)
        conn._arm_reader()

    def _refuse(self, hdr: Header) -> None:
        self.vm.stats["refused"] += 1
        self.vm.enqueue(hdr.reply(OP_RST))

    # -- host -> guest --------------------------------------------------------------------------
    def accept(self, sock: socket.socket) -> None:
        """A host process connected to the VM's Unix socket: read its CONNECT line, then ask the guest."""
        task = self.loop.create_task(self._handshake(sock))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            line = await asyncio.wait_for(_read_line(self.loop, sock), CONNECT_TIMEOUT)
            port = _parse_connect(line)
        except (OSError, ValueError, TimeoutError) as exc:
            log.info("%s: bad CONNECT from the host: %s", self.vm.name, exc)
            sock.close()
            return
        except BaseException:  # cancelled by reset(): the VM went away during the handshake
            sock.close()
            raise
        if not self.host_connects:
            log.info("%s: the host may not connect to it (port %d): closed", self.vm.name, port)
            self.vm.stats["host_refused"] += 1
            sock.close()
            return
        if not self.vm.running:
            sock.close()
            return
        host_port = self._free_port(port)
        conn = HostConnection(self, sock, host_port, port, CONNECTING)
        self.connections[conn.key] = conn
        conn._timer = self.loop.call_later(CONNECT_TIMEOUT, conn.connect_timed_out)
        self.vm.stats["host_connects"] += 1
        conn.send(OP_REQUEST)

    def _free_port(self, guest_port: int) -> int:
        while True:
            port = next(self._ports) & 0xFFFFFFFF
            if port >= 1024 and (port, guest_port) not in self.connections:
                return port

    def forget(self, conn: HostConnection) -> None:
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]

    def reset(self) -> None:
        """The VM is gone or reset: close every host socket without telling the guest."""
        for conn in list(self.connections.values()):
            conn.close(reset_guest=False)
        for task in list(self._handshakes):
            task.cancel()

    def detach(self) -> None:
        """The VM leaves the switch: its connections end and its share goes to the others."""
        self.reset()
        if self in self.budget.sides:
            self.budget.sides.remove(self)


async def _read_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Read up to and including the first newline, one byte at a time so no stream data is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        if len(line) >= CONNECT_LINE_MAX:
            raise ValueError(f"no newline in the first {CONNECT_LINE_MAX} bytes")
        byte = await loop.sock_recv(sock, 1)
        if not byte:
            raise ValueError("connection closed before the CONNECT line")
        line += byte
    return line


def _parse_connect(line: bytes) -> int:
    words = line.decode("ascii", "replace").split()
    if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit() or int(words[1]) > 0xFFFFFFFF:
        raise ValueError(f"expected 'CONNECT <port>', got {line[:CONNECT_LINE_MAX]!r}")
    return int(words[1])
