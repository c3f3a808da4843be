"""The emulated security processor over real sockets against the real lab issuers: evidence round trips,
hostile frames answered with error frames while the service keeps serving, one VM unable to stall another."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import socket
import struct
import threading
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from teelab_guest import evidence, nsm_wire, tee_wire
from teelab_guest.tee_wire import MAGIC, MAX_REQUEST_BODY, Request

from harness.aio import shared_loop
from harness.attest import LAB, LabAuthority, Policy, parse_snp_report, parse_tdx_quote, verify
from harness.enclave.nsm import SecurityModule
from harness.tee.errors import DeviceConfigError
from harness.tee.measure import LaunchInputs, measure_snp, measure_tdx
from harness.tee.platforms import lab_authority, lab_snp_issuer, lab_tdx_issuer
from harness.tee.processor import DeviceService, FrameAssembler, RateLimit, SecurityProcessor

HOST_DATA = bytes(range(32))


@pytest.fixture(scope="module")
def authority() -> LabAuthority:
    return lab_authority()  # the session's lab CA, under the test state dir


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> LaunchInputs:
    root = tmp_path_factory.mktemp("boot")
    (root / "vmlinuz").write_bytes(b"kernel" * 1000)
    (root / "initrd").write_bytes(b"initrd" * 1000)
    return LaunchInputs(root / "vmlinuz", root / "initrd", "console=ttyS0 teelab.role=cvm", vcpus=2)


@pytest.fixture(scope="module")
def snp_processor(authority: LabAuthority, launch: LaunchInputs) -> SecurityProcessor:
    return SecurityProcessor("snp", snp=lab_snp_issuer(authority, measure_snp(launch), HOST_DATA))


class Client:
    """The guest's end of a port: raw frames over a socket, with a timeout on every read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(10)
        self.stream = sock.makefile("rwb", buffering=0)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(tee_wire.encode_frame(message, 1 << 20))

    def receive(self) -> dict[str, Any]:
        return tee_wire.read_frame(self.stream)  # type: ignore[arg-type]

    def call(self, request: Request) -> dict[str, Any]:
        return tee_wire.call(self.stream, request)  # type: ignore[arg-type]


@contextlib.contextmanager
def served(processor: SecurityProcessor, rate: Any = RateLimit) -> Iterator[tuple[Client, DeviceService]]:
    ours, theirs = socket.socketpair()
    service = DeviceService(processor, name="test", rate=rate)
    service.serve_socket(theirs, shared_loop())
    try:
        yield Client(ours), service
    finally:
        service.close()
        ours.close()


def _snp_request(report_data: bytes = b"\x11" * 64, vmpl: int = 0) -> Request:
    return Request(tee_wire.new_request_id(), "snp-report", report_data=report_data, vmpl=vmpl)


# -- round trips ----------------------------------------------------------------------------------------


def test_snp_report_round_trip_verifies_with_the_lab_root(
    snp_processor: SecurityProcessor, authority: LabAuthority, launch: LaunchInputs
) -> None:
    with served(snp_processor) as (client, _service):
        assert client.call(Request(7, "describe")) == {"v": 1, "id": 7, "ok": True, "kind": "snp"}
        answer = client.call(_snp_request(b"\x42" * 64, vmpl=1))
    assert answer["ok"] is True and len(answer["report"]) == 1184
    report = parse_snp_report(answer["report"])
    assert report.measurement == measure_snp(launch).measurement
    assert (report.report_data, report.host_data, report.policy, report.vmpl) == (
        b"\x42" * 64, HOST_DATA, 0x30000, 1
    )  # fmt: skip
    policy = Policy(
        roots=(LAB,),
        measurement=measure_snp(launch).measurement,
        host_data=HOST_DATA,
        report_data=b"\x42" * 64,
        max_vmpl=1,
        lab_dir=authority.directory,
    )
    verdict = verify(answer["report"], policy, certificates=answer["certs"])
    assert verdict.ok, verdict.reasons
    assert not verify(answer["report"], Policy(lab_dir=authority.directory), certificates=answer["certs"]).ok


def test_tdx_quote_round_trip_carries_the_lab_mrtd_and_rtmrs(
    authority: LabAuthority, launch: LaunchInputs
) -> None:
    expected = measure_tdx(launch)
    processor = SecurityProcessor("tdx", tdx=lab_tdx_issuer(authority, expected))
    with served(processor) as (client, _service):
        answer = client.call(Request(1, "tdx-quote", report_data=b"\x33" * 64))
    quote = parse_tdx_quote(answer["quote"])
    assert quote.body.mrtd == expected.mrtd
    assert (quote.body.rtmr0, quote.body.rtmr1, quote.body.rtmr2, quote.body.rtmr3) == expected.rtmrs
    assert quote.body.report_data == b"\x33" * 64
    assert int.from_bytes(quote.body.td_attributes, "little") == expected.td_attributes
    policy = Policy(roots=(LAB,), mrtd=expected.mrtd, rtmrs=dict(enumerate(expected.rtmrs)),
                    report_data=b"\x33" * 64, lab_dir=authority.directory)  # fmt: skip
    verdict = verify(answer["quote"], policy)
    assert verdict.ok, verdict.reasons


def test_nsm_requests_pass_through_to_the_security_module(authority: LabAuthority) -> None:
    module = SecurityModule(
        {0: b"\x01" * 48}, debug=False, issue_document=authority.attestation_document, module_id="i-test-enc"
    )
    with served(SecurityProcessor("nsm", nsm=module)) as (client, _service):
        described = client.call(Request(1, "nsm", nsm_request=nsm_wire.describe_pcr(0)))
        attested = client.call(Request(2, "nsm", nsm_request=nsm_wire.attestation(user_data=b"bound")))
    pcr = nsm_wire.decode_response(described["response"], "DescribePCR")
    assert pcr.data == b"\x01" * 48 and pcr.lock is True  # type: ignore[union-attr]
    document = nsm_wire.decode_response(attested["response"], "Attestation").document  # type: ignore[union-attr]
    verdict = verify(document, Policy(roots=(LAB,), pcrs={0: b"\x01" * 48}, user_data=b"bound",
                                      lab_dir=authority.directory))  # fmt: skip
    assert verdict.ok, verdict.reasons


# -- the guest's evidence API through the emulated port -------------------------------------------------


@contextlib.contextmanager
def port_tree(root: Path, service_end: socket.socket) -> Iterator[None]:
    """``root/dev/virtio-ports/org.teelab.tee.0`` as a raw tty bridged to ``service_end``, the way the
    guest sees a virtio-serial port: a character device it opens read-write."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    link = root / evidence.TEE_PORT_DEVICE
    link.parent.mkdir(parents=True)
    link.symlink_to(os.ttyname(slave))
    stop = threading.Event()

    def bridge() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([master, service_end], [], [], 0.05)
            for fd in ready:
                if fd == master:
                    service_end.sendall(os.read(master, 65536))
                else:
                    data = service_end.recv(65536)
                    if not data:
                        return
                    os.write(master, data)

    thread = threading.Thread(target=bridge, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        os.close(master)
        os.close(slave)


def test_get_evidence_over_the_emulated_port(
    snp_processor: SecurityProcessor, authority: LabAuthority, launch: LaunchInputs, tmp_path: Path
) -> None:
    with served(snp_processor) as (client, _service), port_tree(tmp_path, client.sock):
        result = evidence.get_evidence(b"nonce", vmpl=0, platform=evidence.Platform(str(tmp_path)))
    assert (result.kind, result.source) == ("snp", "emulated")
    policy = Policy(roots=(LAB,), measurement=measure_snp(launch).measurement,
                    report_data=b"nonce" + bytes(59), lab_dir=authority.directory)  # fmt: skip
    assert verify(result.blob, policy, certificates=result.aux).ok


# -- hostile guests -------------------------------------------------------------------------------------


def _frame(body: bytes) -> bytes:
    return MAGIC + struct.pack(">I", len(body)) + body


def _request(**fields: Any) -> bytes:
    return _frame(cbor2.dumps({"v": 1, "id": 5, **fields}))


HOSTILE = {
    "garbage bytes": (b"\x00garbage, not a frame at all", "bad-frame"),
    "oversized length": (MAGIC + struct.pack(">I", MAX_REQUEST_BODY + 1), "too-large"),
    "4 GiB length": (MAGIC + b"\xff\xff\xff\xff", "too-large"),
    "garbage cbor": (_frame(b"\xff\xfe\xfd"), "bad-cbor"),
    "truncated cbor": (_frame(b"\xa3\x61v"), "bad-cbor"),
    "cbor array": (_frame(cbor2.dumps([1, 2, 3])), "bad-cbor"),
    "deep nesting": (_frame(b"\x81" * 5000 + b"\x00"), "bad-cbor"),
    "wrong version": (_frame(cbor2.dumps({"v": 2, "id": 1, "op": "describe"})), "bad-request"),
    "negative id": (_frame(cbor2.dumps({"v": 1, "id": -1, "op": "describe"})), "bad-request"),
    "text id": (_frame(cbor2.dumps({"v": 1, "id": "1", "op": "describe"})), "bad-request"),
    "unknown op": (_request(op="reboot"), "bad-request"),
    "short report_data": (_request(op="snp-report", report_data=b"x" * 63, vmpl=0), "bad-request"),
    "text report_data": (_request(op="snp-report", report_data="x" * 64, vmpl=0), "bad-request"),
    "vmpl 4": (_request(op="snp-report", report_data=bytes(64), vmpl=4), "bad-request"),
    "vmpl true": (_request(op="snp-report", report_data=bytes(64), vmpl=True), "bad-request"),
    "vmpl float": (_request(op="snp-report", report_data=bytes(64), vmpl=0.0), "bad-request"),
    "extra field": (_request(op="describe", shell="rm -rf /"), "bad-request"),
    "tagged datetime": (_frame(cbor2.dumps({"v": 1, "id": 5, "op": "snp-report",
                                            "report_data": cbor2.CBORTag(1, 0), "vmpl": 0})), "bad-request"),
    "op of another kind": (_request(op="tdx-quote", report_data=bytes(64)), "unsupported"),
    "empty nsm request": (_request(op="nsm", request=b""), "bad-request"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_frames_get_an_error_frame_and_the_service_keeps_serving(
    case: str, snp_processor: SecurityProcessor
) -> None:
    data, code = HOSTILE[case]
    with served(snp_processor) as (client, service):
        client.send_raw(data)
        error = client.receive()
        assert (error["ok"], error["error"]) == (False, code), error
        assert isinstance(error["message"], str) and error["message"]
        answer = client.call(_snp_request())
        assert answer["ok"] is True and len(answer["report"]) == 1184
        assert service.serving


def test_a_refused_request_keeps_its_id() -> None:
    processor = SecurityProcessor("tdx", tdx=lambda *, report_data: b"quote")
    with served(processor) as (client, _service):
        client.send_raw(_request(op="snp-report", report_data=bytes(64), vmpl=0))
        assert client.receive()["id"] == 5


def test_an_incomplete_frame_times_out_and_the_port_recovers(
    snp_processor: SecurityProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("harness.tee.processor.FRAME_TIMEOUT", 0.2)
    with served(snp_processor) as (client, _service):
        client.send_raw(MAGIC + struct.pack(">I", 100) + b"only part of it")
        assert client.receive()["error"] == "bad-frame"
        assert client.call(_snp_request())["ok"] is True


def test_an_issuer_failure_is_an_internal_error_not_a_crash() -> None:
    def broken(*, report_data: bytes, vmpl: int) -> tuple[bytes, bytes]:
        raise RuntimeError("signing key unavailable")

    with served(SecurityProcessor("snp", snp=broken)) as (client, service):
        answer = client.call(_snp_request())
        assert (answer["ok"], answer["error"]) == (False, "internal")
        assert "signing key unavailable" in answer["message"]
        assert client.call(Request(9, "describe"))["kind"] == "snp"
        assert service.stats.refused == 1 and service.stats.answered == 1


def test_a_guest_that_hangs_up_mid_frame_ends_only_its_own_service(snp_processor: SecurityProcessor) -> None:
    with served(snp_processor) as (client, service), served(snp_processor) as (other, _):
        client.send_raw(MAGIC + b"\x00\x00")
        client.sock.shutdown(socket.SHUT_RDWR)
        assert other.call(_snp_request())["ok"] is True
        for _ in range(100):
            if not service.serving:
                break
            threading.Event().wait(0.02)
        assert not service.serving


def test_a_port_is_served_until_its_guest_hangs_up_even_when_the_service_is_dropped() -> None:
    import gc

    from harness.tee import processor as device

    ours, theirs = socket.socketpair()
    DeviceService(SecurityProcessor("tdx", tdx=lambda *, report_data: b"q"), name="dropped").serve_socket(
        theirs, shared_loop()
    )
    del theirs  # the service owns it now
    gc.collect()
    client = Client(ours)
    assert client.call(Request(3, "describe"))["kind"] == "tdx"
    serving = set(device._SERVING)
    client.stream.close()
    ours.close()
    for _ in range(100):
        if not serving & device._SERVING:
            break
        threading.Event().wait(0.02)
    assert not serving & device._SERVING


def test_a_stalled_vm_does_not_stall_another() -> None:
    release = threading.Event()

    def stuck(*, report_data: bytes, vmpl: int) -> tuple[bytes, bytes]:
        release.wait(30)
        return bytes(1184), b""

    quick = SecurityProcessor("tdx", tdx=lambda *, report_data: b"quote:" + report_data)
    with served(SecurityProcessor("snp", snp=stuck)) as (slow, _), served(quick) as (fast, _):
        slow.send(_snp_request().to_message())
        try:
            answer = fast.call(Request(1, "tdx-quote", report_data=b"\x01" * 64))
            assert answer["quote"] == b"quote:" + b"\x01" * 64
            assert not release.is_set()  # the slow VM was still inside its issuer
        finally:
            release.set()
        assert slow.receive()["ok"] is True


def test_a_flooding_guest_is_slowed_down_not_refused() -> None:
    calls = []
    processor = SecurityProcessor("tdx", tdx=lambda *, report_data: calls.append(1) or b"q")
    with served(processor, rate=lambda: RateLimit(per_second=1000, burst=2)) as (client, service):
        for index in range(5):
            client.send(Request(index, "tdx-quote", report_data=bytes(64)).to_message())
        answers = [client.receive() for _ in range(5)]
    assert [a["id"] for a in answers] == [0, 1, 2, 3, 4] and all(a["ok"] for a in answers)
    assert len(calls) == 5 and service.stats.refused == 0


def test_rate_limit_allows_a_burst_then_asks_for_a_pause() -> None:
    limit = RateLimit(per_second=10, burst=3)
    assert [limit.delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert 0.0 < limit.delay() <= 0.1 + 1e-6


def test_a_processor_needs_the_issuer_of_its_kind() -> None:
    with pytest.raises(DeviceConfigError):
        SecurityProcessor("snp", tdx=lambda *, report_data: b"")
    with pytest.raises(DeviceConfigError):
        SecurityProcessor("sgx")


# -- framing properties ---------------------------------------------------------------------------------

NO_MAGIC = st.binary(max_size=3000).map(lambda b: b.replace(b"T", b"t"))


@settings(max_examples=200, deadline=None)
@given(garbage=NO_MAGIC, bodies=st.lists(st.binary(max_size=300), max_size=4), split=st.integers(1, 97))
def test_frames_after_garbage_are_recovered_whatever_the_chunking(
    garbage: bytes, bodies: list[bytes], split: int
) -> None:
    stream = garbage + b"".join(_frame(b) for b in bodies)
    assembler = FrameAssembler(MAX_REQUEST_BODY)
    items: list[bytes | tee_wire.WireError] = []
    for start in range(0, len(stream), split):
        items += assembler.feed(stream[start : start + split])
    errors = [i for i in items if isinstance(i, tee_wire.WireError)]
    assert [i for i in items if isinstance(i, bytes)] == bodies
    assert len(errors) == (1 if len(garbage) >= tee_wire.HEADER.size or (garbage and bodies) else 0)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=20000))
def test_any_bytes_leave_the_assembler_bounded(data: bytes) -> None:
    assembler = FrameAssembler(MAX_REQUEST_BODY)
    for start in range(0, len(data), 4096):
        for item in assembler.feed(data[start : start + 4096]):
            assert isinstance(item, tee_wire.WireError) or len(item) <= MAX_REQUEST_BODY
        assert len(assembler._buffer) <= tee_wire.HEADER.size + MAX_REQUEST_BODY


@settings(max_examples=200, deadline=None)
@given(
    message=st.dictionaries(
        st.sampled_from(["v", "id", "op", "report_data", "vmpl", "request", "x"]),
        st.one_of(st.integers(-(2**70), 2**70), st.binary(max_size=70), st.text(max_size=10), st.none(),
                  st.booleans(), st.sampled_from(["describe", "snp-report", "tdx-quote", "nsm"])),
    )
)  # fmt: skip
def test_any_message_gets_a_well_formed_answer(message: dict[str, Any]) -> None:
    processor = SecurityProcessor("tdx", tdx=lambda *, report_data: b"quote")
    answer = processor.answer(message)
    assert answer["v"] == 1 and answer["ok"] in (True, False)
    if not answer["ok"]:
        assert answer["error"] in tee_wire.ERRORS
    tee_wire.encode_frame(answer, tee_wire.MAX_RESPONSE_BODY)
