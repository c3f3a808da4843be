"""The virtio-vsock packet header (virtio spec, "Socket Device"): 44 bytes, little-endian."""

from __future__ import annotations

import struct
from typing import NamedTuple

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44

HOST_CID = 2
RESERVED_CIDS = frozenset({0, 1, 2, 0xFFFFFFFF})
MAX_CID = 0xFFFFFFFE
MAX_PORT = 0xFFFFFFFF

TYPE_STREAM = 1
TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {
    OP_REQUEST: "REQUEST",
    OP_RESPONSE: "RESPONSE",
    OP_RST: "RST",
    OP_SHUTDOWN: "SHUTDOWN",
    OP_RW: "RW",
    OP_CREDIT_UPDATE: "CREDIT_UPDATE",
    OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}

SHUTDOWN_RECEIVE = 1  # the sender will receive no more data
SHUTDOWN_SEND = 2  # the sender will send no more data
SHUTDOWN_BOTH = SHUTDOWN_RECEIVE | SHUTDOWN_SEND

# Largest payload a Linux guest puts in one packet (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); larger is a fault.
MAX_PAYLOAD = 64 * 1024


class Header(NamedTuple):
    """One packet header; CIDs are 64-bit on the wire with the upper 32 bits zero."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    def reply(self, op: int, *, flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0) -> Header:
        """A header going back along the same flow (source and destination swapped), without payload."""
        return Header(
            self.dst_cid,
            self.src_cid,
            self.dst_port,
            self.src_port,
            0,
            TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        )

    def describe(self) -> str:
        op = OP_NAMES.get(self.op, f"op{self.op}")
        return f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} len={self.len}"


def unpack(data: bytes | memoryview) -> Header:
    return Header._make(HEADER.unpack_from(data))


def control(
    src: tuple[int, int],
    dst: tuple[int, int],
    op: int,
    *,
    flags: int = 0,
    buf_alloc: int = 0,
    fwd_cnt: int = 0,
) -> Header:
    """A header without payload from ``src`` (cid, port) to ``dst``."""
    return Header(src[0], dst[0], src[1], dst[1], 0, TYPE_STREAM, op, flags, buf_alloc, fwd_cnt)
