"""The enclave security module's wire format: NSM API requests and responses as CBOR, for guest and host.

Shapes follow aws-nitro-enclaves-nsm-api's serde_cbor encoding of its ``Request``/``Response`` enums: a unit
variant is a bare string ("DescribeNSM"), any other variant a one-entry map ({"DescribePCR": {"index": 0}}),
errors are {"Error": "InvalidIndex"}. Guests encode requests and decode responses; the host parses requests
and encodes responses with the same definitions. Stdlib and cbor2 only (guests run Debian's Python 3.11).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cbor2

REQUEST_MAX_BYTES = 0x1000  # NSM_REQUEST_MAX_SIZE
RESPONSE_MAX_BYTES = 0x3000  # NSM_RESPONSE_MAX_SIZE
MAX_PCRS = 32
BOOT_LOCKED_PCRS = 16  # PCRs 0-15 are locked at boot; 16-31 can be extended and locked
PCR_BYTES = 48
ATTESTATION_FIELD_MAX_BYTES = 1024  # user_data, nonce and public_key each
DIGEST = "SHA384"
U16_MAX = 0xFFFF


class ErrorCode(StrEnum):
    """The NSM API's ErrorCode names, as they appear on the wire."""

    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"


class Operation(StrEnum):
    """Request (and matching response) names."""

    DESCRIBE_PCR = "DescribePCR"
    EXTEND_PCR = "ExtendPCR"
    LOCK_PCR = "LockPCR"
    LOCK_PCRS = "LockPCRs"
    DESCRIBE_NSM = "DescribeNSM"
    ATTESTATION = "Attestation"
    GET_RANDOM = "GetRandom"


UNIT_REQUESTS = frozenset({Operation.DESCRIBE_NSM, Operation.GET_RANDOM})
UNIT_RESPONSES = frozenset({Operation.LOCK_PCR, Operation.LOCK_PCRS})


class NsmError(Exception):
    """The module answered {"Error": code}, or a request or response could not be used (``code`` says why)."""

    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        super().__init__(f"{code.value}: {detail}" if detail else code.value)
        self.code = code
        self.detail = detail


# ------------------------------------------------------------------------------------------ requests (guest)


def _request(value: Any) -> bytes:
    data = cbor2.dumps(value)
    if len(data) > REQUEST_MAX_BYTES:
        # what the NSM driver library answers without sending
        raise NsmError(ErrorCode.INPUT_TOO_LARGE, f"request is {len(data)} bytes, over {REQUEST_MAX_BYTES}")
    return data


def _u16(value: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= U16_MAX:
        raise ValueError(f"{what} must be an integer 0..{U16_MAX}, got {value!r}")
    return value


def _optional_bytes(value: bytes | None, what: str) -> bytes | None:
    if value is not None and not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes or None, got {type(value).__name__}")
    return None if value is None else bytes(value)


def describe_pcr(index: int) -> bytes:
    return _request({Operation.DESCRIBE_PCR.value: {"index": _u16(index, "index")}})


def extend_pcr(index: int, data: bytes) -> bytes:
    if data is None:
        raise TypeError("data must be bytes")
    body = {"index": _u16(index, "index"), "data": _optional_bytes(data, "data")}
    return _request({Operation.EXTEND_PCR.value: body})


def lock_pcr(index: int) -> bytes:
    return _request({Operation.LOCK_PCR.value: {"index": _u16(index, "index")}})


def lock_pcrs(range_: int) -> bytes:
    """Lock PCRs [0, range_)."""
    return _request({Operation.LOCK_PCRS.value: {"range": _u16(range_, "range")}})


def describe_nsm() -> bytes:
    return _request(Operation.DESCRIBE_NSM.value)


def attestation(
    *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
) -> bytes:
    body = {
        "user_data": _optional_bytes(user_data, "user_data"),
        "nonce": _optional_bytes(nonce, "nonce"),
        "public_key": _optional_bytes(public_key, "public_key"),
    }
    return _request({Operation.ATTESTATION.value: body})


def get_random() -> bytes:
    return _request(Operation.GET_RANDOM.value)


# ------------------------------------------------------------------------------------------ requests (host)


@dataclass(frozen=True)
class DescribePcrRequest:
    index: int


@dataclass(frozen=True)
class ExtendPcrRequest:
    index: int
    data: bytes


@dataclass(frozen=True)
class LockPcrRequest:
    index: int


@dataclass(frozen=True)
class LockPcrsRequest:
    range: int


@dataclass(frozen=True)
class DescribeNsmRequest:
    pass


@dataclass(frozen=True)
class AttestationRequest:
    user_data: bytes | None
    nonce: bytes | None
    public_key: bytes | None


@dataclass(frozen=True)
class GetRandomRequest:
    pass


Request = (
    DescribePcrRequest
    | ExtendPcrRequest
    | LockPcrRequest
    | LockPcrsRequest
    | DescribeNsmRequest
    | AttestationRequest
    | GetRandomRequest
)


def loads_exactly(data: bytes) -> Any:
    """One CBOR item that spans all of ``data``; any decoding problem raises ValueError."""
    stream = io.BytesIO(bytes(data))
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as err:  # cbor2 raises several types for hostile input (incl. RecursionError)
        raise ValueError(f"not CBOR: {err}") from None
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} bytes after the CBOR item")
    return value


def parse_request(data: bytes) -> Request:
    """Decode a request. Undecodable or unknown requests raise NsmError(InvalidOperation); a known request
    with missing or mistyped fields raises NsmError(InvalidArgument). Size limits are the module's to
    check."""
    operation, body, bare = _split_request(data)
    name = operation.value
    if operation in UNIT_REQUESTS:
        if not bare and body is not None:
            raise NsmError(ErrorCode.INVALID_ARGUMENT, f"{name} takes no arguments")
        return DescribeNsmRequest() if operation is Operation.DESCRIBE_NSM else GetRandomRequest()
    if bare:
        raise NsmError(ErrorCode.INVALID_OPERATION, f"{name} needs a map of arguments")
    if not isinstance(body, dict):
        raise NsmError(ErrorCode.INVALID_ARGUMENT, f"the arguments of {name} are not a map")
    return _request_with_arguments(operation, body)


def _split_request(data: bytes) -> tuple[Operation, object, bool]:
    """(operation, its arguments, whether it came bare as a name) of an encoded request."""
    try:
        item = loads_exactly(data)
    except ValueError as err:
        raise NsmError(ErrorCode.INVALID_OPERATION, str(err)) from None
    if isinstance(item, str):
        name, body, bare = item, None, True
    elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item)), str):
        name, body = next(iter(item.items()))
        bare = False
    else:
        raise NsmError(ErrorCode.INVALID_OPERATION, "a request is a name or a one-entry map keyed by a name")
    try:
        return Operation(name), body, bare
    except ValueError:
        raise NsmError(ErrorCode.INVALID_OPERATION, f"unknown request {name[:40]!r}") from None


def _request_with_arguments(operation: Operation, body: dict[Any, Any]) -> Request:
    if operation is Operation.DESCRIBE_PCR:
        return DescribePcrRequest(_u16_field(body, "index"))
    if operation is Operation.EXTEND_PCR:
        data_field = _bytes_field(body, "data")
        if data_field is None:
            raise NsmError(ErrorCode.INVALID_ARGUMENT, "ExtendPCR needs data")
        return ExtendPcrRequest(_u16_field(body, "index"), data_field)
    if operation is Operation.LOCK_PCR:
        return LockPcrRequest(_u16_field(body, "index"))
    if operation is Operation.LOCK_PCRS:
        return LockPcrsRequest(_u16_field(body, "range"))
    public_key = _bytes_field(body, "public_key")
    pubkey = _bytes_field(body, "pubkey")  # QingTian's spelling
    if public_key is not None and pubkey is not None:
        raise NsmError(ErrorCode.INVALID_ARGUMENT, "give public_key or pubkey, not both")
    return AttestationRequest(
        _bytes_field(body, "user_data"),
        _bytes_field(body, "nonce"),
        public_key if public_key is not None else pubkey,
    )


def _u16_field(body: dict[Any, Any], key: str) -> int:
    value = body.get(key)
    if type(value) is not int or not 0 <= value <= U16_MAX:
        raise NsmError(ErrorCode.INVALID_ARGUMENT, f"{key} must be an integer 0..{U16_MAX}")
    return value


def _bytes_field(body: dict[Any, Any], key: str) -> bytes | None:
    """A byte field as serde_bytes reads it: byte string, text (as UTF-8) or array of 0..255; null: None."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, list) and all(type(v) is int and 0 <= v <= 255 for v in value):
        return bytes(value)
    raise NsmError(ErrorCode.INVALID_ARGUMENT, f"{key} must be a byte string or null")


# ------------------------------------------------------------------------------------------ responses (host)


def describe_pcr_response(*, lock: bool, data: bytes) -> bytes:
    return cbor2.dumps({Operation.DESCRIBE_PCR.value: {"lock": lock, "data": data}})


def extend_pcr_response(*, data: bytes) -> bytes:
    return cbor2.dumps({Operation.EXTEND_PCR.value: {"data": data}})


def lock_pcr_response() -> bytes:
    return cbor2.dumps(Operation.LOCK_PCR.value)


def lock_pcrs_response() -> bytes:
    return cbor2.dumps(Operation.LOCK_PCRS.value)


def describe_nsm_response(
    *,
    version: tuple[int, int, int],
    module_id: str,
    max_pcrs: int,
    locked_pcrs: list[int],
    digest: str = DIGEST,
) -> bytes:
    body = {
        "version_major": version[0],
        "version_minor": version[1],
        "version_patch": version[2],
        "module_id": module_id,
        "max_pcrs": max_pcrs,
        "locked_pcrs": sorted(locked_pcrs),
        "digest": digest,
    }
    return cbor2.dumps({Operation.DESCRIBE_NSM.value: body})


def attestation_response(*, document: bytes) -> bytes:
    return cbor2.dumps({Operation.ATTESTATION.value: {"document": document}})


def get_random_response(*, random: bytes) -> bytes:
    return cbor2.dumps({Operation.GET_RANDOM.value: {"random": random}})


def error_response(code: ErrorCode) -> bytes:
    return cbor2.dumps({"Error": ErrorCode(code).value})


# ------------------------------------------------------------------------------------------ responses (guest)


@dataclass(frozen=True)
class DescribePcrResponse:
    lock: bool
    data: bytes


@dataclass(frozen=True)
class ExtendPcrResponse:
    data: bytes


@dataclass(frozen=True)
class LockPcrResponse:
    pass


@dataclass(frozen=True)
class LockPcrsResponse:
    pass


@dataclass(frozen=True)
class DescribeNsmResponse:
    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str


@dataclass(frozen=True)
class AttestationResponse:
    document: bytes


@dataclass(frozen=True)
class GetRandomResponse:
    random: bytes


Response = (
    DescribePcrResponse
    | ExtendPcrResponse
    | LockPcrResponse
    | LockPcrsResponse
    | DescribeNsmResponse
    | AttestationResponse
    | GetRandomResponse
)


def decode_response(data: bytes, expect: Operation | str | None = None) -> Response:
    """Decode a response; raise NsmError(code) for {"Error": code}, NsmError(InvalidResponse) for anything
    that is not a well-formed response (or not the ``expect``ed one)."""
    try:
        item = loads_exactly(data)
    except ValueError as err:
        raise NsmError(ErrorCode.INVALID_RESPONSE, str(err)) from None
    if isinstance(item, dict) and len(item) == 1 and "Error" in item:
        try:
            code = ErrorCode(item["Error"])
        except ValueError:
            raise NsmError(ErrorCode.INVALID_RESPONSE, f"unknown error {item['Error']!r}") from None
        raise NsmError(code, "the security module refused the request")
    if isinstance(item, str):
        name, body = item, None
    elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item)), str):
        name, body = next(iter(item.items()))
    else:
        raise NsmError(ErrorCode.INVALID_RESPONSE, "not a response")
    if expect is not None and name != Operation(expect).value:
        raise NsmError(
            ErrorCode.INVALID_RESPONSE, f"expected a {Operation(expect).value} response, got {name!r}"
        )
    try:
        return _response(Operation(name), body)
    except (ValueError, KeyError, TypeError) as err:
        raise NsmError(ErrorCode.INVALID_RESPONSE, f"malformed {name} response: {err}") from None


def _response(operation: Operation, body: Any) -> Response:
    if operation in UNIT_RESPONSES:
        if body is not None:
            raise ValueError("carries a body")
        return LockPcrResponse() if operation is Operation.LOCK_PCR else LockPcrsResponse()
    if not isinstance(body, dict):
        raise TypeError("body is not a map")
    if operation is Operation.DESCRIBE_PCR:
        return DescribePcrResponse(_typed(body, "lock", bool), _typed(body, "data", bytes))
    if operation is Operation.EXTEND_PCR:
        return ExtendPcrResponse(_typed(body, "data", bytes))
    if operation is Operation.DESCRIBE_NSM:
        locked = _typed(body, "locked_pcrs", list)
        if not all(type(i) is int for i in locked):
            raise TypeError("locked_pcrs holds a non-integer")
        return DescribeNsmResponse(
            _typed(body, "version_major", int),
            _typed(body, "version_minor", int),
            _typed(body, "version_patch", int),
            _typed(body, "module_id", str),
            _typed(body, "max_pcrs", int),
            tuple(locked),
            _typed(body, "digest", str),
        )
    if operation is Operation.ATTESTATION:
        return AttestationResponse(_typed(body, "document", bytes))
    if operation is Operation.GET_RANDOM:
        return GetRandomResponse(_typed(body, "random", bytes))
    raise ValueError(f"{operation.value} is not a response")


def _typed(body: dict[Any, Any], key: str, kind: type) -> Any:
    value = body[key]
    if type(value) is not kind:
        raise TypeError(f"{key} is {type(value).__name__}, not {kind.__name__}")
    return value
