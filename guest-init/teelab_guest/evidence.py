"""Attestation evidence inside a guest, one API over every source; the first usable one wins: configfs-tsm
with a provider bound, /dev/sev-guest, /dev/tdx_guest, /dev/nsm, then the emulated security-processor port.
Each source passed over is reported with the reason (``Evidence.passed_over``, ``describe_sources``).
Stdlib + cbor2."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from teelab_guest import nsm_wire, tee_wire

TSM_REPORT_DIR = "sys/kernel/config/tsm/report"
SEV_GUEST_DEVICE = "dev/sev-guest"
TDX_GUEST_DEVICE = "dev/tdx_guest"
NSM_DEVICE = "dev/nsm"
TEE_PORT_DEVICE = "dev/virtio-ports/" + tee_wire.TEE_PORT
SOURCES = ("configfs-tsm", "sev-guest", "tdx-guest", "nsm", "emulated")

# ioctl numbers: _IOWR(type, nr, size) = 3 << 30 | size << 16 | type << 8 | nr
SNP_GET_REPORT = 0xC0205300  # 'S', 0, struct snp_guest_request_ioctl (32 bytes)
TDX_CMD_GET_REPORT0 = 0xC4405401  # 'T', 1, struct tdx_report_req (64 + 1024 bytes)
NSM_IOCTL_RAW = 0xC0200A00  # 0x0A, 0, struct nsm_raw (two iovecs)

SNP_MSG_VERSION = 1
SNP_REPORT_REQ = struct.Struct("<64sI28x")  # struct snp_report_req: user_data, vmpl, rsvd
SNP_GUEST_REQUEST = struct.Struct("<B7xQQQ")  # msg_version, req_data, resp_data, exitinfo2
SNP_RESPONSE_BYTES = 4000  # struct snp_report_resp
SNP_RESPONSE_HEADER = struct.Struct("<II24x")  # status, report_size, reserved: the report follows
TDX_REPORT_BYTES = 1024
NSM_RAW = struct.Struct("<QQQQ")  # request.addr, request.len, response.addr, response.len
NSM_RESPONSE_MAX = 0x3000
TSM_GENERATION_RETRIES = 3
PROVIDER_KINDS = {"sev_guest": "snp", "tdx_guest": "tdx"}

TD_REPORT_NOTE = (
    "a TD report (TDREPORT_STRUCT) is MAC'd for this CPU only and is not a quote: it cannot be verified "
    "elsewhere; a quote needs configfs-tsm with a quote provider or the QGS on vsock CID 2 port 4050"
)

Ioctl = Callable[[int, int, Any, bool], Any]


class EvidenceError(Exception):
    """Evidence could not be obtained from ``source``."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message


class NoTsmProvider(EvidenceError):
    """configfs-tsm is there, but no provider (sev_guest, tdx_guest) is bound: the next source is tried."""

    def __init__(self) -> None:
        super().__init__("configfs-tsm", "configfs-tsm is there but no provider is bound (mkdir: ENXIO)")


@dataclass(frozen=True)
class Evidence:
    """What the platform returned for one report_data.

    ``kind``: ``snp`` (1184-byte ATTESTATION_REPORT; ``aux`` is the certificate table when the source
    gives one), ``tdx`` (a TDX quote), ``sgx`` (an SGX quote of the VM's enclave), ``tdx-report`` (a TD
    report, not a quote: see ``note``), ``nsm`` (a COSE_Sign1 attestation document with report_data as
    user_data). ``source`` names the interface.
    """

    kind: str
    blob: bytes
    aux: bytes = b""
    source: str = ""
    note: str = ""
    passed_over: tuple[str, ...] = ()  # the sources tried or present before ``source``, each with why

    @property
    def verifiable_remotely(self) -> bool:
        return self.kind != "tdx-report"


class SysFs:
    """The file operations configfs-tsm needs; tests substitute a fake that behaves like the kernel's."""

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def read(self, path: str) -> bytes:
        with open(path, "rb", buffering=0) as stream:
            chunks = []
            while chunk := stream.read(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def write(self, path: str, data: bytes) -> None:
        with open(path, "wb", buffering=0) as stream:
            stream.write(data)


@dataclass(frozen=True)
class Platform:
    """Where the evidence sources are: ``root`` is ``/`` in a guest, a fake tree in tests."""

    root: str = "/"
    fs: SysFs = field(default_factory=SysFs)
    ioctl: Ioctl = fcntl.ioctl  # type: ignore[assignment]
    timeout: float = 10.0

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def available(self) -> list[str]:
        """The sources present, in the order ``get_evidence`` tries them."""
        present = {
            "configfs-tsm": self.fs.isdir(self.path(TSM_REPORT_DIR)),
            "sev-guest": os.path.exists(self.path(SEV_GUEST_DEVICE)),
            "tdx-guest": os.path.exists(self.path(TDX_GUEST_DEVICE)),
            "nsm": os.path.exists(self.path(NSM_DEVICE)),
            "emulated": os.path.exists(self.path(TEE_PORT_DEVICE)),
        }
        return [name for name in SOURCES if present[name]]


def get_evidence(
    report_data: bytes, *, vmpl: int | None = None, platform: Platform | None = None
) -> Evidence:
    """Evidence binding ``report_data`` (up to 64 bytes, zero-padded) from the first source that exists.

    ``vmpl`` is the SEV-SNP privilege level (None: the platform's default, 0 for the ioctl and the port).
    Raises EvidenceError when no source exists or the one that exists fails.
    """
    platform = platform or Platform()
    data = pad_report_data(report_data)
    if vmpl is not None and not 0 <= vmpl <= tee_wire.MAX_VMPL:
        raise EvidenceError("request", f"vmpl {vmpl} is not 0..{tee_wire.MAX_VMPL}")
    sources = platform.available()
    if not sources:
        raise EvidenceError(
            "platform",
            f"no evidence source under {platform.root}: none of {TSM_REPORT_DIR}, {SEV_GUEST_DEVICE}, "
            f"{TDX_GUEST_DEVICE}, {NSM_DEVICE}, {TEE_PORT_DEVICE}",
        )
    fetch = {
        "configfs-tsm": lambda: configfs_tsm_report(platform, data, vmpl),
        "sev-guest": lambda: sev_guest_report(platform, data, vmpl or 0),
        "tdx-guest": lambda: tdx_guest_report(platform, data),
        "nsm": lambda: nsm_evidence(platform, data),
        "emulated": lambda: emulated_evidence(platform, data, vmpl or 0),
    }
    reasons = dict(absent_sources(platform))
    for source in sources:
        try:
            evidence = fetch[source]()
        except NoTsmProvider as exc:  # only this falls through: a failed device request is not retried
            if source == sources[-1]:
                raise
            reasons[source] = exc.message
            continue
        earlier = SOURCES[: SOURCES.index(source)]
        return replace(evidence, passed_over=tuple(reasons[s] for s in earlier if s in reasons))
    raise AssertionError("unreachable: the last source returns or raises")


def absent_sources(platform: Platform) -> list[tuple[str, str]]:
    """The sources that are not there, each with what is missing."""
    missing = {
        "configfs-tsm": f"no {TSM_REPORT_DIR} (configfs not mounted, or no tsm module: Linux 6.7+)",
        "sev-guest": f"no {SEV_GUEST_DEVICE}",
        "tdx-guest": f"no {TDX_GUEST_DEVICE}",
        "nsm": f"no {NSM_DEVICE}",
        "emulated": f"no {TEE_PORT_DEVICE}",
    }
    present = platform.available()
    return [(source, missing[source]) for source in SOURCES if source not in present]


def describe_sources(platform: Platform | None = None) -> str:
    """Which source ``get_evidence`` would use and why the ones before it are passed over: configfs-tsm is
    probed (an entry made and removed) to tell a bound provider from none."""
    platform = platform or Platform()
    reasons = dict(absent_sources(platform))
    for source in SOURCES:
        if source in reasons:
            continue
        if source == "configfs-tsm":
            provider = tsm_provider(platform)
            if provider is None:
                reasons[source] = NoTsmProvider().message
                continue
            return f"configfs-tsm (provider {provider})"
        before = "; ".join(reasons[s] for s in SOURCES[: SOURCES.index(source)])
        return f"{source}" + (f", because: {before}" if before else "")
    return "none: " + "; ".join(reasons.values())


def tsm_provider(platform: Platform) -> str | None:
    """The provider bound to configfs-tsm (``sev_guest``, ``tdx_guest``), None when none is (ENXIO)."""
    entry = os.path.join(platform.path(TSM_REPORT_DIR), f"teelab-probe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        platform.fs.mkdir(entry)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise EvidenceError("configfs-tsm", f"mkdir {entry}: {exc.strerror or exc}") from exc
    try:
        return platform.fs.read(os.path.join(entry, "provider")).decode().strip()
    finally:
        with contextlib.suppress(OSError):
            platform.fs.rmdir(entry)


def pad_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, (bytes, bytearray)) or len(report_data) > tee_wire.REPORT_DATA_BYTES:
        raise EvidenceError("request", f"report_data must be at most {tee_wire.REPORT_DATA_BYTES} bytes")
    return bytes(report_data).ljust(tee_wire.REPORT_DATA_BYTES, b"\0")


# -- configfs-tsm -------------------------------------------------------------------------------------------


def configfs_tsm_report(platform: Platform, report_data: bytes, vmpl: int | None) -> Evidence:
    """mkdir an entry, read provider and generation, write privlevel (SNP) and inblob, read outblob and
    auxblob, check that generation moved only by our writes, rmdir; retried when another writer raced."""
    fs = platform.fs
    base = platform.path(TSM_REPORT_DIR)
    for _attempt in range(TSM_GENERATION_RETRIES):
        entry = os.path.join(base, f"teelab-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            fs.mkdir(entry)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # the tsm module is loaded, no sev_guest/tdx_guest provider bound
                raise NoTsmProvider() from exc
            raise EvidenceError("configfs-tsm", f"mkdir {entry}: {exc.strerror or exc}") from exc
        try:
            evidence = _tsm_once(fs, entry, report_data, vmpl)
        except OSError as exc:
            raise EvidenceError("configfs-tsm", f"{exc.filename or entry}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                fs.rmdir(entry)
        if evidence is not None:
            return evidence
    raise EvidenceError("configfs-tsm", f"generation moved under us {TSM_GENERATION_RETRIES} times")


def _tsm_once(fs: SysFs, entry: str, report_data: bytes, vmpl: int | None) -> Evidence | None:
    def attribute(name: str) -> str:
        return os.path.join(entry, name)

    provider = fs.read(attribute("provider")).decode().strip()
    generation = int(fs.read(attribute("generation")))
    writes = 0
    if vmpl is not None and fs.exists(attribute("privlevel")):
        fs.write(attribute("privlevel"), f"{vmpl}\n".encode())
        writes += 1
    fs.write(attribute("inblob"), report_data)
    writes += 1
    outblob = fs.read(attribute("outblob"))
    auxblob = fs.read(attribute("auxblob")) if fs.exists(attribute("auxblob")) else b""
    if int(fs.read(attribute("generation"))) != generation + writes:
        return None
    kind = PROVIDER_KINDS.get(provider, provider)
    return Evidence(kind, outblob, auxblob, "configfs-tsm", f"provider {provider}")


# -- /dev/sev-guest -----------------------------------------------------------------------------------------


def snp_report_request(report_data: bytes, vmpl: int) -> bytes:
    """struct snp_report_req (96 bytes)."""
    return SNP_REPORT_REQ.pack(report_data, vmpl)


def snp_guest_request(request_address: int, response_address: int) -> bytes:
    """struct snp_guest_request_ioctl (32 bytes) pointing at the request and response buffers."""
    return SNP_GUEST_REQUEST.pack(SNP_MSG_VERSION, request_address, response_address, 0)


def parse_snp_report_response(response: bytes) -> bytes:
    """The report inside struct snp_report_resp (MSG_REPORT_RSP: status, report_size, reserved, report)."""
    status, size = SNP_RESPONSE_HEADER.unpack_from(response)
    if status != 0:
        raise EvidenceError("sev-guest", f"firmware status {status:#x} in MSG_REPORT_RSP")
    start = SNP_RESPONSE_HEADER.size
    if size != tee_wire.SNP_REPORT_BYTES or start + size > len(response):
        raise EvidenceError("sev-guest", f"report_size {size} is not {tee_wire.SNP_REPORT_BYTES}")
    return bytes(response[start : start + size])


def sev_guest_report(platform: Platform, report_data: bytes, vmpl: int) -> Evidence:
    """SNP_GET_REPORT on /dev/sev-guest. (A failed request can wipe the VMPCK until reboot: one try.)"""
    request = ctypes.create_string_buffer(snp_report_request(report_data, vmpl), SNP_REPORT_REQ.size)
    response = ctypes.create_string_buffer(SNP_RESPONSE_BYTES)
    argument = bytearray(snp_guest_request(ctypes.addressof(request), ctypes.addressof(response)))
    with _device(platform, SEV_GUEST_DEVICE, "sev-guest") as fd:
        try:
            platform.ioctl(fd, SNP_GET_REPORT, argument, True)
        except OSError as exc:
            exitinfo2 = SNP_GUEST_REQUEST.unpack(bytes(argument))[3]
            raise EvidenceError(
                "sev-guest",
                f"SNP_GET_REPORT: {exc.strerror or exc} (fw_error {exitinfo2 & 0xFFFFFFFF:#x}, "
                f"vmm_error {exitinfo2 >> 32:#x})",
            ) from exc
    report = parse_snp_report_response(response.raw)
    return Evidence(
        "snp", report, b"", "sev-guest", "no certificate table: fetch the VCEK for chip_id and reported_tcb"
    )


# -- /dev/tdx_guest -----------------------------------------------------------------------------------------


def tdx_report_request(report_data: bytes) -> bytearray:
    """struct tdx_report_req: reportdata[64] then room for tdreport[1024]."""
    return bytearray(report_data + bytes(TDX_REPORT_BYTES))


def tdx_guest_report(platform: Platform, report_data: bytes) -> Evidence:
    argument = tdx_report_request(report_data)
    with _device(platform, TDX_GUEST_DEVICE, "tdx-guest") as fd:
        try:
            platform.ioctl(fd, TDX_CMD_GET_REPORT0, argument, True)
        except OSError as exc:
            raise EvidenceError("tdx-guest", f"TDX_CMD_GET_REPORT0: {exc.strerror or exc}") from exc
    return Evidence(
        "tdx-report", bytes(argument[tee_wire.REPORT_DATA_BYTES :]), b"", "tdx-guest", TD_REPORT_NOTE
    )


# -- /dev/nsm -----------------------------------------------------------------------------------------------


def nsm_document(response: bytes, source: str) -> bytes:
    """The attestation document of an NSM Attestation response; EvidenceError for an NSM error."""
    try:
        return nsm_wire.decode_response(response, nsm_wire.Operation.ATTESTATION).document  # type: ignore[union-attr]
    except nsm_wire.NsmError as exc:
        raise EvidenceError(source, f"NSM {exc}") from None


def nsm_raw(request_address: int, request_length: int, response_address: int, response_length: int) -> bytes:
    """struct nsm_raw: the request and response iovecs."""
    return NSM_RAW.pack(request_address, request_length, response_address, response_length)


def nsm_call(request: bytes, *, platform: Platform | None = None) -> bytes:
    """One raw NSM request (CBOR) -> response (CBOR), through /dev/nsm or else the emulated port."""
    platform = platform or Platform()
    if len(request) > tee_wire.MAX_NSM_REQUEST:
        raise EvidenceError("nsm", f"request of {len(request)} bytes exceeds {tee_wire.MAX_NSM_REQUEST}")
    if os.path.exists(platform.path(NSM_DEVICE)):
        return _nsm_ioctl(platform, request)
    with _port(platform) as port:
        kind = _describe(port)
        if kind != "nsm":
            raise EvidenceError("emulated", f"the security processor is {kind}, not an NSM")
        answer = _expect(port, tee_wire.Request(tee_wire.new_request_id(), "nsm", nsm_request=request))
    return _field(answer, "response")


def _nsm_ioctl(platform: Platform, request: bytes) -> bytes:
    request_buffer = ctypes.create_string_buffer(request, len(request))
    response = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
    argument = bytearray(
        nsm_raw(ctypes.addressof(request_buffer), len(request), ctypes.addressof(response), NSM_RESPONSE_MAX)
    )
    with _device(platform, NSM_DEVICE, "nsm") as fd:
        try:
            platform.ioctl(fd, NSM_IOCTL_RAW, argument, True)
        except OSError as exc:
            raise EvidenceError("nsm", f"NSM_IOCTL_RAW: {exc.strerror or exc}") from exc
    length = NSM_RAW.unpack(bytes(argument))[3]
    if length > NSM_RESPONSE_MAX:
        raise EvidenceError("nsm", f"driver returned a {length}-byte response")
    return response.raw[:length]


def nsm_evidence(platform: Platform, report_data: bytes) -> Evidence:
    document = nsm_document(_nsm_ioctl(platform, nsm_wire.attestation(user_data=report_data)), "nsm")
    return Evidence("nsm", document, b"", "nsm", "report_data is the document's user_data")


# -- the emulated security processor ------------------------------------------------------------------------


def emulated_evidence(platform: Platform, report_data: bytes, vmpl: int) -> Evidence:
    source = "emulated"
    with _port(platform) as port:
        kind = _describe(port)
        new_id = tee_wire.new_request_id()
        if kind == "snp":
            answer = _expect(port, tee_wire.Request(new_id, "snp-report", report_data=report_data, vmpl=vmpl))
            return Evidence("snp", _field(answer, "report"), _field(answer, "certs"), source)
        if kind in ("tdx", "sgx"):
            answer = _expect(port, tee_wire.Request(new_id, f"{kind}-quote", report_data=report_data))
            return Evidence(kind, _field(answer, "quote"), b"", source)
        if kind == "nsm":
            request = tee_wire.Request(new_id, "nsm", nsm_request=nsm_wire.attestation(user_data=report_data))
            document = nsm_document(_field(_expect(port, request), "response"), source)
            return Evidence("nsm", document, b"", source, "report_data is the document's user_data")
    raise EvidenceError(source, f"the security processor describes itself as {kind!r}")


class _PortStream:
    """Blocking reads and writes on the port's fd with one overall deadline."""

    def __init__(self, fd: int, timeout: float) -> None:
        self.fd = fd
        self.deadline = time.monotonic() + timeout

    def _wait(self, readable: bool) -> None:
        left = self.deadline - time.monotonic()
        ready = select.select([self.fd] if readable else [], [] if readable else [self.fd], [], max(left, 0))
        if not any(ready):
            raise EvidenceError("emulated", "the security processor did not answer in time")

    def read(self, count: int) -> bytes:
        self._wait(readable=True)
        return os.read(self.fd, count)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._wait(readable=False)
            view = view[os.write(self.fd, view) :]

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _port(platform: Platform) -> Iterator[_PortStream]:
    """The port, opened exclusively (the kernel allows one opener: EBUSY is retried until the deadline)."""
    path = platform.path(TEE_PORT_DEVICE)
    deadline = time.monotonic() + platform.timeout
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise EvidenceError("emulated", f"open {path}: {exc.strerror or exc}") from exc
            time.sleep(0.02)
    try:
        yield _PortStream(fd, platform.timeout)
    finally:
        os.close(fd)


def _describe(port: _PortStream) -> str:
    kind = _expect(port, tee_wire.Request(tee_wire.new_request_id(), "describe")).get("kind")
    if kind not in tee_wire.KINDS:
        raise EvidenceError("emulated", f"unknown security processor kind {kind!r}")
    return str(kind)


def _expect(port: _PortStream, request: tee_wire.Request) -> dict[str, Any]:
    try:
        answer = tee_wire.call(port, request)  # type: ignore[arg-type]
    except (tee_wire.WireError, EOFError, OSError) as exc:
        raise EvidenceError("emulated", f"{request.op}: {exc}") from exc
    if answer.get("ok") is not True:
        raise EvidenceError(
            "emulated", f"{request.op} refused: {answer.get('error')}: {answer.get('message')}"
        )
    return answer


def _field(answer: dict[str, Any], name: str) -> bytes:
    value = answer.get(name)
    if not isinstance(value, bytes):
        raise EvidenceError("emulated", f"response field {name!r} is not bytes")
    return value


@contextlib.contextmanager
def _device(platform: Platform, relative: str, source: str) -> Iterator[int]:
    path = platform.path(relative)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise EvidenceError(source, f"open {path}: {exc.strerror or exc}") from exc
    try:
        yield fd
    finally:
        os.close(fd)
