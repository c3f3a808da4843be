"""``teelab doctor --require GROUP``: a host short of what its group promises fails with E206 (exit 2) and
every missing piece named; a host that has it all passes. Fixture host trees stand in for SNP, TDX and KVM
hosts; this machine (PVM-based KVM, QEMU 7.2) is a tcg host and nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest
from host_trees import PVM_HOST, SNP_HOST, TDX_HOST, HostTree

from harness.cli import main
from harness.host import capability
from harness.host.probe import probe

FIXTURES = Path(__file__).resolve().parents[1] / "vectors" / "snp-measure" / "fixtures"
AMDSEV_OVMF = FIXTURES / "ovmf_AmdSev_suffix.bin"
PLAIN_OVMF = FIXTURES / "ovmf_OvmfX64_suffix.bin"
KVM_HOST = HostTree(flags=("fpu", "vmx"), kvm=True)


@pytest.fixture(autouse=True)
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No teelab.toml and no firmware variables of the caller's leak into these tests."""
    empty = tmp_path / "teelab.toml"
    empty.write_text("")
    monkeypatch.setenv("TEELAB_CONFIG", str(empty))
    for name in ("TEELAB_SNP_OVMF", "TEELAB_TDX_OVMF"):
        monkeypatch.delenv(name, raising=False)


def doctor(tmp_path: Path, host: HostTree, group: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    root = host.write(tmp_path / "host")
    status = main(["doctor", "--require", group, "--root", str(root)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize(
    ("host", "group", "reasons"),
    [
        (PVM_HOST, "kvm", ["no usable KVM", "no vmx or svm"]),
        (PVM_HOST, "vhost-vsock", ["no /dev/vhost-vsock"]),
        (PVM_HOST, "snp", ["does not offer SEV-SNP", "QEMU 7.2.22 is older than 9.1", "no sev-snp-guest",
                           "no usable KVM", "no SNP firmware configured"]),
        (PVM_HOST, "tdx", ["does not offer TDX", "QEMU 7.2.22 is older than 10.1", "no tdx-guest",
                           "no usable KVM", "no TDX firmware configured"]),
        (SNP_HOST, "tdx", ["does not offer TDX", "older than 10.1", "no tdx-guest"]),
        (TDX_HOST, "snp", ["does not offer SEV-SNP", "no sev-snp-guest"]),
    ],
)  # fmt: skip
def test_a_host_short_of_its_group_fails_with_every_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: HostTree, group: str, reasons: list[str]
) -> None:
    status, output = doctor(tmp_path, host, group, capsys)
    assert status == 2
    assert f"[ E206 ] this host lacks what the {group} group promises" in output
    for reason in reasons:
        assert reason in output


@pytest.mark.parametrize(
    ("host", "group", "firmware"),
    [(PVM_HOST, "tcg", None), (KVM_HOST, "kvm", None), (SNP_HOST, "vhost-vsock", None),
     (SNP_HOST, "snp", AMDSEV_OVMF), (TDX_HOST, "tdx", PLAIN_OVMF)],
)  # fmt: skip
def test_a_host_with_everything_its_group_promises_passes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    host: HostTree,
    group: str,
    firmware: Path | None,
) -> None:
    if firmware is not None:
        monkeypatch.setenv(f"TEELAB_{group.upper()}_OVMF", str(firmware))
    status, output = doctor(tmp_path, host, group, capsys)
    assert status == 0, output
    assert "teelab doctor" in output


def test_an_snp_host_needs_the_amdsev_ovmf_that_hashes_the_kernel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEELAB_SNP_OVMF", str(PLAIN_OVMF))
    status, output = doctor(tmp_path, SNP_HOST, "snp", capsys)
    assert status == 2 and "is not an AmdSev OVMF" in output
    monkeypatch.setenv("TEELAB_SNP_OVMF", str(tmp_path / "gone.fd"))
    status, output = doctor(tmp_path, SNP_HOST, "snp", capsys)
    assert status == 2 and "which is not a file" in output


def test_the_firmware_can_come_from_teelab_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "lab.toml"
    config.write_text(f'[snp]\novmf = "{AMDSEV_OVMF}"\n')
    monkeypatch.setenv("TEELAB_CONFIG", str(config))
    assert doctor(tmp_path, SNP_HOST, "snp", capsys)[0] == 0


def test_an_snp_object_in_a_qemu_too_old_for_it_is_still_refused(tmp_path: Path) -> None:
    backported = HostTree(**{**SNP_HOST.__dict__, "qemu_version": "9.0.2"})
    assert capability.missing("snp", probe(backported.write(tmp_path / "host"))) == [
        "QEMU 9.0.2 is older than 9.1"
    ]


def test_an_unknown_group_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--require", "cca"]) == 2
    assert "E102" in capsys.readouterr().err
