"""Which evidence source a guest uses and why: configfs-tsm with no provider bound (the tsm module loaded on a
guest that is no SEV-SNP or TDX guest: mkdir gives ENXIO) is passed over for the next source, with the reason;
a bound provider is named; a failed device request is not passed over."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from teelab_guest import evidence
from teelab_guest.evidence import (
    EvidenceError,
    NoTsmProvider,
    Platform,
    SysFs,
    describe_sources,
    get_evidence,
)

NO_PROVIDER = "configfs-tsm is there but no provider is bound (mkdir: ENXIO)"


class UnboundTsm(SysFs):
    """configfs-tsm as the kernel has it when no provider registered: report/ exists, mkdir fails ENXIO."""

    def mkdir(self, path: str) -> None:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), path)


class BoundTsm(SysFs):
    """A provider is bound: an entry shows it in ``provider`` (a real directory stands in for configfs)."""

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        Path(path, "provider").write_text("sev_guest\n")

    def rmdir(self, path: str) -> None:
        os.unlink(os.path.join(path, "provider"))
        os.rmdir(path)


def tree(root: Path, *relative: str) -> str:
    for name in (evidence.TSM_REPORT_DIR, *relative):
        path = root / name
        if name == evidence.TSM_REPORT_DIR:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return str(root)


def test_unbound_configfs_tsm_is_passed_over_for_the_device_with_the_reason(tmp_path: Path) -> None:
    def tdx_ioctl(fd: int, request: int, argument: bytearray, mutate: bool) -> int:
        argument[64 + 128 : 64 + 192] = argument[:64]
        return 0

    platform = Platform(tree(tmp_path, evidence.TDX_GUEST_DEVICE), fs=UnboundTsm(), ioctl=tdx_ioctl)
    result = get_evidence(b"\x11" * 64, platform=platform)
    assert result.source == "tdx-guest" and result.blob[128:192] == b"\x11" * 64
    assert result.passed_over == (NO_PROVIDER, "no dev/sev-guest")
    assert describe_sources(platform) == f"tdx-guest, because: {NO_PROVIDER}; no dev/sev-guest"


def test_a_bound_provider_is_named_and_its_probe_entry_removed(tmp_path: Path) -> None:
    platform = Platform(tree(tmp_path, evidence.TEE_PORT_DEVICE), fs=BoundTsm())
    assert describe_sources(platform) == "configfs-tsm (provider sev_guest)"
    assert os.listdir(tmp_path / evidence.TSM_REPORT_DIR) == []


def test_the_emulated_port_is_named_with_every_reason_before_it(tmp_path: Path) -> None:
    platform = Platform(tree(tmp_path, evidence.TEE_PORT_DEVICE), fs=UnboundTsm())
    assert describe_sources(platform) == (
        f"emulated, because: {NO_PROVIDER}; no dev/sev-guest; no dev/tdx_guest; no dev/nsm"
    )
    without_configfs = Platform(str(tmp_path / "bare"))
    (tmp_path / "bare" / evidence.TEE_PORT_DEVICE).parent.mkdir(parents=True)
    (tmp_path / "bare" / evidence.TEE_PORT_DEVICE).write_bytes(b"")
    assert describe_sources(without_configfs).startswith(
        "emulated, because: no sys/kernel/config/tsm/report (configfs not mounted, or no tsm module"
    )


def test_unbound_configfs_tsm_alone_is_an_error_that_says_so(tmp_path: Path) -> None:
    with pytest.raises(NoTsmProvider, match="no provider is bound"):
        get_evidence(b"x", platform=Platform(tree(tmp_path), fs=UnboundTsm()))
    assert describe_sources(Platform(tree(tmp_path / "b"), fs=UnboundTsm())).startswith("none: ")


def test_a_failed_device_request_is_not_passed_over(tmp_path: Path) -> None:
    def failing(fd: int, request: int, argument: bytearray, mutate: bool) -> int:
        raise OSError(errno.EIO, "Input/output error")

    platform = Platform(
        tree(tmp_path, evidence.SEV_GUEST_DEVICE, evidence.TEE_PORT_DEVICE), fs=UnboundTsm(), ioctl=failing
    )
    with pytest.raises(EvidenceError) as caught:
        get_evidence(b"x", platform=platform)
    assert caught.value.source == "sev-guest"
