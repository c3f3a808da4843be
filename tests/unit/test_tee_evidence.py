"""The guest evidence API: configfs-tsm against a fake that behaves like the kernel's, the ioctl structs'
bytes, and the ioctl paths driven through a fake ioctl that reads and writes the real buffers."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from teelab_guest import evidence
from teelab_guest.evidence import EvidenceError, Platform, SysFs, get_evidence


def _iowr(kind: int, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | number


def test_ioctl_numbers_are_iowr_of_the_kernel_structs() -> None:
    assert evidence.SNP_GET_REPORT == _iowr(ord("S"), 0, 32) == 0xC0205300
    assert evidence.TDX_CMD_GET_REPORT0 == _iowr(ord("T"), 1, 64 + 1024) == 0xC4405401
    assert evidence.NSM_IOCTL_RAW == _iowr(0x0A, 0, 32) == 0xC0200A00


def test_snp_report_request_bytes() -> None:
    raw = evidence.snp_report_request(bytes(range(64)), 2)
    assert raw == bytes(range(64)) + b"\x02\x00\x00\x00" + bytes(28)
    assert len(raw) == 96


def test_snp_guest_request_bytes() -> None:
    raw = evidence.snp_guest_request(0x1122334455667788, 0x99AABBCCDDEEFF00)
    assert raw.hex() == (
        "01" + "00" * 7  # msg_version = 1, padding to the u64 alignment
        + "8877665544332211"  # req_data, little-endian
        + "00ffeeddccbbaa99"  # resp_data
        + "00" * 8  # exitinfo2
    )  # fmt: skip


def test_nsm_raw_and_tdx_request_bytes() -> None:
    assert evidence.nsm_raw(1, 2, 3, 0x3000).hex() == (
        "0100000000000000" "0200000000000000" "0300000000000000" "0030000000000000"
    )  # fmt: skip
    request = evidence.tdx_report_request(b"\xab" * 64)
    assert len(request) == 1088 and request[:64] == b"\xab" * 64 and request[64:] == bytes(1024)


def test_snp_report_response_is_checked() -> None:
    report = b"\x02" + bytes(1183)
    good = struct.pack("<II24x", 0, 1184) + report + bytes(4000 - 32 - 1184)
    assert evidence.parse_snp_report_response(good) == report
    with pytest.raises(EvidenceError, match="status 0x16"):
        evidence.parse_snp_report_response(struct.pack("<II24x", 0x16, 1184) + report)
    with pytest.raises(EvidenceError, match="report_size 100"):
        evidence.parse_snp_report_response(struct.pack("<II24x", 0, 100) + report)


def test_report_data_is_padded_and_bounded() -> None:
    assert evidence.pad_report_data(b"abc") == b"abc" + bytes(61)
    with pytest.raises(EvidenceError, match="at most 64"):
        evidence.pad_report_data(bytes(65))


# -- configfs-tsm -------------------------------------------------------------------------------------------


def fake_snp_report(inblob: bytes, privlevel: int) -> tuple[bytes, bytes]:
    report = bytearray(1184)
    struct.pack_into("<I", report, 0, 2)
    struct.pack_into("<I", report, 0x30, privlevel)
    report[0x50:0x90] = inblob
    return bytes(report), b"cert-table"


def fake_tdx_quote(inblob: bytes, privlevel: int) -> tuple[bytes, bytes]:
    quote = bytearray(0x2FC)
    struct.pack_into("<HHI", quote, 0, 4, 2, 0x81)
    quote[0x238:0x278] = inblob
    return bytes(quote), b""


class FakeTsm(SysFs):
    """/sys/kernel/config/tsm/report as the kernel's configfs-tsm shows it: mkdir makes an entry with its
    attributes; writes to inblob and privlevel bump generation; outblob is generated from them."""

    def __init__(
        self,
        root: Path,
        provider: str,
        make: Callable[[bytes, int], tuple[bytes, bytes]],
        privlevel_floor: int = 0,
    ) -> None:
        self.base = str(root / evidence.TSM_REPORT_DIR)
        self.provider = provider
        self.make = make
        self.floor = privlevel_floor
        self.entries: dict[str, dict[str, object]] = {}
        self.created: list[str] = []
        self.racer: Callable[[dict[str, object]], None] | None = None
        self.log: list[tuple[str, str]] = []

    def _split(self, path: str) -> tuple[dict[str, object], str]:
        entry, attribute = os.path.split(path)
        if entry not in self.entries:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        names = {"provider", "generation", "inblob", "outblob"}
        if self.provider == "sev_guest":
            names |= {"privlevel", "privlevel_floor", "auxblob"}
        if attribute not in names:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.entries[entry], attribute

    def isdir(self, path: str) -> bool:
        return path.rstrip("/") == self.base or path in self.entries

    def exists(self, path: str) -> bool:
        try:
            self._split(path)
        except FileNotFoundError:
            return self.isdir(path)
        return True

    def mkdir(self, path: str) -> None:
        if os.path.dirname(path) != self.base:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        if path in self.entries:
            raise FileExistsError(errno.EEXIST, "File exists", path)
        self.entries[path] = {"generation": 0, "privlevel": 0, "inblob": None}
        self.created.append(path)

    def rmdir(self, path: str) -> None:
        if path not in self.entries:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        del self.entries[path]

    def read(self, path: str) -> bytes:
        state, attribute = self._split(path)
        self.log.append(("read", attribute))
        if attribute == "provider":
            return f"{self.provider}\n".encode()
        if attribute in ("generation", "privlevel_floor"):
            value = state["generation"] if attribute == "generation" else self.floor
            return f"{value}\n".encode()
        if attribute in ("outblob", "auxblob"):
            if state["inblob"] is None:
                raise OSError(errno.EINVAL, "Invalid argument", path)
            if self.racer is not None:
                self.racer(state)
            outblob, auxblob = self.make(state["inblob"], state["privlevel"])  # type: ignore[arg-type]
            return outblob if attribute == "outblob" else auxblob
        raise PermissionError(errno.EACCES, "Permission denied", path)

    def write(self, path: str, data: bytes) -> None:
        state, attribute = self._split(path)
        self.log.append(("write", attribute))
        if attribute == "inblob":
            if len(data) > 64:
                raise OSError(errno.EFBIG, "File too large", path)
            state["inblob"] = data.ljust(64, b"\0")
        elif attribute == "privlevel":
            level = int(data)
            if not self.floor <= level <= 3:
                raise OSError(errno.EINVAL, "Invalid argument", path)
            state["privlevel"] = level
        else:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        state["generation"] = int(state["generation"]) + 1  # type: ignore[call-overload]


def test_configfs_tsm_snp_round_trip(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "sev_guest", fake_snp_report)
    result = get_evidence(b"nonce", vmpl=1, platform=Platform(str(tmp_path), fs=fake))
    assert result.kind == "snp" and result.source == "configfs-tsm"
    assert len(result.blob) == 1184 and result.blob[0x50:0x90] == b"nonce" + bytes(59)
    assert struct.unpack_from("<I", result.blob, 0x30)[0] == 1  # privlevel reached the report
    assert result.aux == b"cert-table"
    assert fake.entries == {} and len(fake.created) == 1  # the entry was removed
    writes = [name for op, name in fake.log if op == "write"]
    assert writes == ["privlevel", "inblob"]
    reads = [name for op, name in fake.log if op == "read"]
    assert reads[:2] == ["provider", "generation"] and reads[-1] == "generation"


def test_configfs_tsm_tdx_has_no_privlevel_or_auxblob(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "tdx_guest", fake_tdx_quote)
    result = get_evidence(b"\x42" * 64, vmpl=0, platform=Platform(str(tmp_path), fs=fake))
    assert result.kind == "tdx" and result.blob[0x238:0x278] == b"\x42" * 64 and result.aux == b""
    assert [name for op, name in fake.log if op == "write"] == ["inblob"]


def test_configfs_tsm_without_vmpl_leaves_the_kernel_default(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "sev_guest", fake_snp_report)
    get_evidence(b"x", platform=Platform(str(tmp_path), fs=fake))
    assert [name for op, name in fake.log if op == "write"] == ["inblob"]


def test_configfs_tsm_retries_when_another_writer_races(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "sev_guest", fake_snp_report)
    races = []

    def race_once(state: dict[str, object]) -> None:
        if not races:
            races.append(1)
            state["generation"] = int(state["generation"]) + 1  # type: ignore[call-overload]

    fake.racer = race_once
    result = get_evidence(b"n", platform=Platform(str(tmp_path), fs=fake))
    assert result.blob[0x50] == ord("n")
    assert len(fake.created) == 2 and fake.entries == {}


def test_configfs_tsm_gives_up_after_repeated_races(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "sev_guest", fake_snp_report)
    fake.racer = lambda state: state.__setitem__("generation", int(state["generation"]) + 1)  # type: ignore
    with pytest.raises(EvidenceError, match="generation moved"):
        get_evidence(b"n", platform=Platform(str(tmp_path), fs=fake))
    assert fake.entries == {}


def test_configfs_tsm_privlevel_below_the_floor_fails_and_cleans_up(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "sev_guest", fake_snp_report, privlevel_floor=2)
    with pytest.raises(EvidenceError, match="privlevel: Invalid argument"):
        get_evidence(b"n", vmpl=0, platform=Platform(str(tmp_path), fs=fake))
    assert fake.entries == {}
    assert get_evidence(b"n", vmpl=2, platform=Platform(str(tmp_path), fs=fake)).blob[0x30] == 2


# -- ioctl paths through a fake ioctl on the real buffers ---------------------------------------------------


def _device_tree(tmp_path: Path, *devices: str) -> Platform:
    for device in devices:
        path = tmp_path / device
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return Platform(str(tmp_path))


def test_sev_guest_ioctl_reads_the_request_and_fills_the_response(tmp_path: Path) -> None:
    seen = {}

    def fake_ioctl(fd: int, request: int, argument: bytearray, mutate: bool) -> int:
        assert request == evidence.SNP_GET_REPORT and mutate and len(argument) == 32
        version, req, resp, _ = struct.unpack("<B7xQQQ", argument)
        user_data, vmpl = struct.unpack("<64sI", ctypes.string_at(req, 68))
        seen.update(version=version, vmpl=vmpl)
        report, _ = fake_snp_report(user_data, vmpl)
        ctypes.memmove(resp, struct.pack("<II24x", 0, 1184) + report, 32 + 1184)
        return 0

    platform = _device_tree(tmp_path, evidence.SEV_GUEST_DEVICE)
    platform = Platform(platform.root, ioctl=fake_ioctl)
    result = get_evidence(b"\x07" * 64, vmpl=3, platform=platform)
    assert seen == {"version": 1, "vmpl": 3}
    assert result.kind == "snp" and result.source == "sev-guest"
    assert result.blob[0x50:0x90] == b"\x07" * 64 and result.aux == b""


def test_sev_guest_ioctl_failure_reports_the_firmware_error(tmp_path: Path) -> None:
    def failing_ioctl(fd: int, request: int, argument: bytearray, mutate: bool) -> int:
        struct.pack_into("<II", argument, 24, 0x16, 0x2)  # fw_error, vmm_error
        raise OSError(errno.EIO, "Input/output error")

    platform = Platform(_device_tree(tmp_path, evidence.SEV_GUEST_DEVICE).root, ioctl=failing_ioctl)
    with pytest.raises(EvidenceError, match=r"fw_error 0x16, vmm_error 0x2"):
        get_evidence(b"x", platform=platform)


def test_tdx_guest_gives_a_td_report_and_says_it_is_not_a_quote(tmp_path: Path) -> None:
    def fake_ioctl(fd: int, request: int, argument: bytearray, mutate: bool) -> int:
        assert request == evidence.TDX_CMD_GET_REPORT0 and len(argument) == 1088
        argument[64 + 128 : 64 + 192] = argument[:64]  # REPORTMACSTRUCT.reportdata
        return 0

    platform = Platform(_device_tree(tmp_path, evidence.TDX_GUEST_DEVICE).root, ioctl=fake_ioctl)
    result = get_evidence(b"\x5a" * 64, platform=platform)
    assert result.kind == "tdx-report" and len(result.blob) == 1024
    assert result.blob[128:192] == b"\x5a" * 64
    assert not result.verifiable_remotely and "not a quote" in result.note


def test_nsm_ioctl_passes_an_attestation_request_and_reads_the_document(tmp_path: Path) -> None:
    def fake_ioctl(fd: int, request: int, argument: bytearray, mutate: bool) -> int:
        assert request == evidence.NSM_IOCTL_RAW
        req, req_len, resp, resp_len = struct.unpack("<QQQQ", argument)
        message = cbor2.loads(ctypes.string_at(req, req_len))
        user_data = message["Attestation"]["user_data"]
        answer = cbor2.dumps({"Attestation": {"document": b"cose:" + user_data}})
        assert len(answer) <= resp_len
        ctypes.memmove(resp, answer, len(answer))
        struct.pack_into("<Q", argument, 24, len(answer))
        return 0

    platform = Platform(_device_tree(tmp_path, evidence.NSM_DEVICE).root, ioctl=fake_ioctl)
    result = get_evidence(b"bound", platform=platform)
    assert result.kind == "nsm" and result.blob == b"cose:bound" + bytes(59)


def test_nsm_errors_are_reported() -> None:
    with pytest.raises(EvidenceError, match="NSM InvalidArgument"):
        evidence.nsm_document(cbor2.dumps({"Error": "InvalidArgument"}), "nsm")
    with pytest.raises(EvidenceError, match="NSM InvalidResponse"):
        evidence.nsm_document(b"\xff\xff", "nsm")
    with pytest.raises(EvidenceError, match="expected a Attestation response"):
        evidence.nsm_document(cbor2.dumps({"GetRandom": {"random": b"x"}}), "nsm")


def test_first_source_that_exists_wins(tmp_path: Path) -> None:
    (tmp_path / evidence.TSM_REPORT_DIR).mkdir(parents=True)
    devices = (evidence.SEV_GUEST_DEVICE, evidence.NSM_DEVICE, evidence.TEE_PORT_DEVICE)
    platform = _device_tree(tmp_path, *devices)
    assert platform.available() == ["configfs-tsm", "sev-guest", "nsm", "emulated"]
    (tmp_path / evidence.TSM_REPORT_DIR).rmdir()
    assert platform.available() == ["sev-guest", "nsm", "emulated"]


def test_no_source_is_an_error_naming_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="no evidence source") as info:
        get_evidence(b"x", platform=Platform(str(tmp_path)))
    assert "org.teelab.tee.0" in str(info.value)
