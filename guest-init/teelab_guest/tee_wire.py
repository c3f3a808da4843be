"""The emulated security-processor port (virtio-serial ``org.teelab.tee.0``): framing and messages.

Stdlib + cbor2 only; the harness's device service imports this module too, so the two sides cannot drift.

A frame is ``MAGIC (4 bytes) | body length (u32, big-endian) | body``; the body is one CBOR map with text
keys. Requests (guest -> host), at most ``MAX_REQUEST_BODY`` bytes::

    {"v": 1, "id": uint, "op": "describe"}                    -> {"kind": "snp" | "tdx" | "sgx" | "nsm"}
    {"v": 1, "id": uint, "op": "snp-report", "report_data": bstr .size 64, "vmpl": 0..3}
                                                               -> {"report": bstr .size 1184, "certs": bstr}
    {"v": 1, "id": uint, "op": "tdx-quote", "report_data": bstr .size 64}
                                                               -> {"quote": bstr}
    {"v": 1, "id": uint, "op": "sgx-quote", "report_data": bstr .size 64}
                                                               -> {"quote": bstr}
    {"v": 1, "id": uint, "op": "nsm", "request": bstr}        -> {"response": bstr}

Every response (host -> guest, at most ``MAX_RESPONSE_BODY`` bytes) carries ``"v"``, the request's ``"id"``
(null when the request could not be read) and ``"ok"``; a refused request gets
``{"ok": false, "error": <one of ERRORS>, "message": text}``. ``certs`` is the SEV-SNP certificate table
(the layout of configfs-tsm's ``auxblob``); ``request``/``response`` are NSM CBOR messages passed through.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import cbor2

TEE_PORT = "org.teelab.tee.0"
VERSION = 1
MAGIC = b"TLT\x01"
HEADER = struct.Struct(">4sI")
MAX_REQUEST_BODY = 8 * 1024
MAX_RESPONSE_BODY = 64 * 1024
REPORT_DATA_BYTES = 64
SNP_REPORT_BYTES = 1184
MAX_VMPL = 3
MAX_NSM_REQUEST = 0x1000  # the NSM driver's request limit
MAX_ID = 2**64 - 1

KINDS = ("snp", "tdx", "sgx", "nsm")
OPS = ("describe", "snp-report", "tdx-quote", "sgx-quote", "nsm")
QUOTE_OPS = ("tdx-quote", "sgx-quote")  # report_data in, a quote out
# Error codes of refused requests: the frame could not be read (bad-frame: no magic; too-large: the length
# exceeds the limit; bad-cbor), the request is malformed (bad-request), this device does not serve the op
# (unsupported), or the device failed (internal).
ERRORS = ("bad-frame", "too-large", "bad-cbor", "bad-request", "unsupported", "internal")


class WireError(Exception):
    """A frame or message that breaks this protocol; ``code`` is one of ``ERRORS``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    """A validated request; only the fields of its ``op`` are set."""

    id: int
    op: str
    report_data: bytes = b""
    vmpl: int = 0
    nsm_request: bytes = b""

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"v": VERSION, "id": self.id, "op": self.op}
        if self.op == "snp-report" or self.op in QUOTE_OPS:
            message["report_data"] = self.report_data
        if self.op == "snp-report":
            message["vmpl"] = self.vmpl
        if self.op == "nsm":
            message["request"] = self.nsm_request
        return message


def encode_frame(message: dict[str, Any], limit: int) -> bytes:
    """One frame holding ``message``; ValueError if its body exceeds ``limit`` bytes."""
    body = cbor2.dumps(message)
    if len(body) > limit:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {limit}")
    return HEADER.pack(MAGIC, len(body)) + body


def parse_header(header: bytes, limit: int) -> int:
    """The body length announced by an 8-byte header; WireError for a bad magic or an oversized body."""
    magic, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise WireError("bad-frame", f"frame starts with {magic.hex()}, not {MAGIC.hex()}")
    if length > limit:
        raise WireError("too-large", f"frame body of {length} bytes exceeds {limit}")
    return length


def decode_body(body: bytes) -> dict[str, Any]:
    """The CBOR map of a frame body; WireError("bad-cbor") for anything else."""
    try:
        message = cbor2.loads(body)
    except Exception as exc:  # cbor2 raises several types for hostile input; all mean the same here
        raise WireError("bad-cbor", f"body is not CBOR: {exc}") from None
    if not isinstance(message, dict):
        raise WireError("bad-cbor", f"body is a CBOR {type(message).__name__}, not a map")
    return message


def request_id(message: dict[str, Any]) -> int | None:
    """The message's id when it is a valid one (so even a refused request's response can be matched)."""
    value = message.get("id")
    return value if type(value) is int and 0 <= value <= MAX_ID else None


def parse_request(message: dict[str, Any]) -> Request:
    """Validate a decoded request; WireError("bad-request") names the first field that is wrong."""
    if message.get("v") != VERSION:
        raise WireError("bad-request", f"version {message.get('v')!r} is not {VERSION}")
    ident = request_id(message)
    if ident is None:
        raise WireError("bad-request", "id must be an unsigned 64-bit integer")
    op = message.get("op")
    if op not in OPS:
        raise WireError("bad-request", f"op {op!r} is not one of {', '.join(OPS)}")
    expected = {"v", "id", "op"} | {
        "describe": set(),
        "snp-report": {"report_data", "vmpl"},
        "tdx-quote": {"report_data"},
        "sgx-quote": {"report_data"},
        "nsm": {"request"},
    }[op]
    unknown = set(message) - expected
    if unknown:
        raise WireError("bad-request", f"unknown fields for {op}: {sorted(map(str, unknown))}")
    if op == "describe":
        return Request(ident, op)
    if op == "nsm":
        nsm = message.get("request")
        if type(nsm) is not bytes or not 0 < len(nsm) <= MAX_NSM_REQUEST:
            raise WireError("bad-request", f"request must be 1 to {MAX_NSM_REQUEST} bytes")
        return Request(ident, op, nsm_request=nsm)
    return _report_request(ident, op, message)


def _report_request(ident: int, op: str, message: dict[str, Any]) -> Request:
    """An snp-report or quote request: report_data, and the VMPL of an SNP report."""
    report_data = message.get("report_data")
    if type(report_data) is not bytes or len(report_data) != REPORT_DATA_BYTES:
        raise WireError("bad-request", f"report_data must be exactly {REPORT_DATA_BYTES} bytes")
    if op in QUOTE_OPS:
        return Request(ident, op, report_data=report_data)
    vmpl = message.get("vmpl")
    if type(vmpl) is not int or not 0 <= vmpl <= MAX_VMPL:
        raise WireError("bad-request", f"vmpl must be an integer 0..{MAX_VMPL}")
    return Request(ident, op, report_data=report_data, vmpl=vmpl)


def ok_response(ident: int, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": ident, "ok": True, **fields}


def error_response(ident: int | None, code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": ident, "ok": False, "error": code, "message": message[:512]}


def new_request_id() -> int:
    return int.from_bytes(os.urandom(8), "big")


# -- the guest's side: blocking I/O on the port ---------------------------------------------------------


def read_exactly(stream: BinaryIO, count: int) -> bytes:
    """``count`` bytes from ``stream``; EOFError if it ends first."""
    chunks = bytearray()
    while len(chunks) < count:
        chunk = stream.read(count - len(chunks))
        if not chunk:
            raise EOFError(f"port closed after {len(chunks)} of {count} bytes")
        chunks += chunk
    return bytes(chunks)


def read_frame(stream: BinaryIO, limit: int = MAX_RESPONSE_BODY) -> dict[str, Any]:
    """One frame's message from a blocking stream."""
    length = parse_header(read_exactly(stream, HEADER.size), limit)
    return decode_body(read_exactly(stream, length))


def call(stream: BinaryIO, request: Request, max_stale: int = 8) -> dict[str, Any]:
    """Send ``request`` and return the matching response. Frames with other ids are skipped: answers to an
    earlier process's requests, or the service's note (id null) about bytes it could not read."""
    stream.write(encode_frame(request.to_message(), MAX_REQUEST_BODY))
    stream.flush()
    for _ in range(max_stale + 1):
        response = read_frame(stream)
        if response.get("id") == request.id:
            return response
    raise WireError("bad-frame", f"no response with id {request.id} after {max_stale} stale frames")
