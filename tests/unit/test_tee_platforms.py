"""TEE backends: golden command lines of real SEV-SNP and TDX guests on the SNP/TDX host fixtures, the
emulated port, the choice by host probe, launch checks over a scripted QMP, and `teelab measure` agreeing
with what the emulated device puts in evidence."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from qemu_hosts import snp_host, tcg_host, tdx_host

from harness.aio import EventLoopThread, shared_loop
from harness.attest import LabAuthority
from harness.cli import main
from harness.qemu import ChardevSocket, MemoryBackendMemfd, SevSnpGuest, TdxGuest, VMSpec, build_argv
from harness.qemu.errors import OptionInvalid, SevSnpUnavailable, TdxUnavailable
from harness.tee.errors import (
    FirmwareCannotMeasureKernel,
    MeasureInputInvalid,
    TeeLaunchMismatch,
    TeeUnavailable,
)
from harness.tee.measure import METHOD_LAB, METHOD_SEV_SNP_MEASURE
from harness.tee.platforms import (
    EmulatedNsmBackend,
    EmulatedSnpBackend,
    EmulatedTdxBackend,
    SnpBackend,
    TdxBackend,
    backend_for_spec,
    choose_backend,
    lab_authority,
)

FIXTURES = Path(__file__).resolve().parents[1] / "vectors" / "snp-measure" / "fixtures"
QMP = ChardevSocket("qmp", fd=3)
CONSOLE = ChardevSocket("console", fd=4)


@pytest.fixture(scope="module")
def authority() -> LabAuthority:
    return lab_authority()  # the session's lab CA, under the test state dir


@pytest.fixture
def guest(tmp_path: Path) -> VMSpec:
    (tmp_path / "vmlinuz").write_bytes(b"kernel image")
    (tmp_path / "initrd").write_bytes(b"initramfs")
    return VMSpec(
        "cvm", tmp_path / "vmlinuz", tmp_path / "initrd", "console=ttyS0 teelab.role=cvm", 2, memory_mib=2048
    )


def _argv(spec: VMSpec, host: Any, tmp_path: Path, **kwargs: Any) -> list[str]:
    argv = build_argv(spec, host, qmp=QMP, console=CONSOLE, **kwargs)
    return [a.replace(str(tmp_path), "$TMP").replace(str(FIXTURES), "$FIXTURES") for a in argv]


def test_real_snp_golden_argv(guest: VMSpec, tmp_path: Path) -> None:
    backend = SnpBackend(firmware=FIXTURES / "ovmf_AmdSev_suffix.bin", host_data=b"\x01" * 32)
    attachment = backend.attach(guest, snp_host())
    assert _argv(attachment.spec, snp_host(), tmp_path) == [
        "qemu-system-x86_64",
        "-name", "cvm,debug-threads=on",
        "-machine", "q35,confidential-guest-support=sev0,memory-backend=ram1",
        "-accel", "kvm",
        "-cpu", "EPYC-v4",
        "-smp", "2",
        "-m", "2048M",
        "-object", "memory-backend-memfd,id=ram1,size=2G,share=true",
        "-object", "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,kernel-hashes=on,"
                   "host-data=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        "-kernel", "$TMP/vmlinuz",
        "-initrd", "$TMP/initrd",
        "-append", "console=ttyS0 teelab.role=cvm",
        "-bios", "$FIXTURES/ovmf_AmdSev_suffix.bin",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-chardev", "socket,id=qmp,fd=3", "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=console,fd=4", "-serial", "chardev:console",
    ]  # fmt: skip
    assert attachment.measurement is not None and attachment.measurement.method == METHOD_SEV_SNP_MEASURE
    assert attachment.service is None


def test_real_snp_keeps_the_specs_memory_backend_and_takes_cbitpos_from_the_host(guest: VMSpec) -> None:
    host = replace(snp_host(), tee=replace(snp_host().tee, cbitpos=47, reduced_phys_bits=5))
    spec = replace(guest, memory=MemoryBackendMemfd("ram0", 2048, share=False))
    configured = SnpBackend(firmware=FIXTURES / "ovmf_AmdSev_suffix.bin").attach(spec, host).spec
    assert configured.memory == MemoryBackendMemfd("ram0", 2048, share=False)  # guest_memfd: private memory
    assert isinstance(configured.confidential, SevSnpGuest)
    assert (configured.confidential.cbitpos, configured.confidential.reduced_phys_bits) == (47, 5)


@pytest.mark.parametrize("firmware", [None, FIXTURES / "ovmf_OvmfX64_suffix.bin"])
def test_real_snp_refuses_firmware_that_would_not_measure_the_kernel(guest: VMSpec, firmware: Path) -> None:
    with pytest.raises(FirmwareCannotMeasureKernel) as info:
        SnpBackend(firmware=firmware).attach(guest, snp_host())
    assert info.value.code == "E953" and "AmdSev" in (info.value.hint or "")


def test_real_snp_on_this_kind_of_host_is_refused_before_launch(guest: VMSpec) -> None:
    with pytest.raises(SevSnpUnavailable):
        SnpBackend(firmware=FIXTURES / "ovmf_AmdSev_suffix.bin").attach(guest, tcg_host())


def test_real_tdx_golden_argv(guest: VMSpec, tmp_path: Path) -> None:
    (tmp_path / "OVMF.fd").write_bytes(b"tdvf")
    attachment = TdxBackend(firmware=tmp_path / "OVMF.fd").attach(guest, tdx_host())
    assert _argv(attachment.spec, tdx_host(), tmp_path) == [
        "qemu-system-x86_64",
        "-name", "cvm,debug-threads=on",
        "-machine", "q35,confidential-guest-support=tdx0,memory-backend=mem0,kernel-irqchip=split,hpet=off",
        "-accel", "kvm",
        "-cpu", "host",
        "-smp", "2",
        "-m", "2048M",
        "-object", "memory-backend-ram,id=mem0,size=2G",
        "-object", '{"qom-type":"tdx-guest","id":"tdx0",'
                   '"quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}',
        "-kernel", "$TMP/vmlinuz",
        "-initrd", "$TMP/initrd",
        "-append", "console=ttyS0 teelab.role=cvm",
        "-bios", "$TMP/OVMF.fd",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-chardev", "socket,id=qmp,fd=3", "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=console,fd=4", "-serial", "chardev:console",
    ]  # fmt: skip
    assert attachment.measurement is None  # real MRTD/RTMRs come from TDVF, which the lab does not model


def test_real_tdx_refuses_what_it_cannot_configure(guest: VMSpec, tmp_path: Path) -> None:
    (tmp_path / "OVMF.fd").write_bytes(b"tdvf")
    with pytest.raises(MeasureInputInvalid, match="firmware"):
        TdxBackend().attach(guest, tdx_host())
    with pytest.raises(OptionInvalid, match="do not fit in 64 bits"):
        TdxBackend(attributes=1 << 64, firmware=tmp_path / "OVMF.fd").attach(guest, tdx_host())
    with pytest.raises(TdxUnavailable):
        TdxBackend(firmware=tmp_path / "OVMF.fd").attach(guest, tcg_host())


def test_emulated_argv_adds_the_tee_port_on_a_socketpair_channel(
    authority: LabAuthority, guest: VMSpec, tmp_path: Path
) -> None:
    spec = replace(guest, confidential=SevSnpGuest(policy=0x30000))
    with EmulatedSnpBackend(authority=authority).attach(spec, tcg_host()) as attachment:
        argv = _argv(attachment.spec, tcg_host(), tmp_path, channels={"tee": 7})
    assert argv[argv.index("-cpu") + 1] == "max"
    assert not any("sev-snp-guest" in a or "memory-backend" in a for a in argv)
    assert argv[-6:] == [
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-chardev", "socket,id=tee,fd=7",
        "-device", "virtserialport,id=tee0,bus=virtio-serial0.0,chardev=tee,name=org.teelab.tee.0",
    ]  # fmt: skip


def test_the_emulated_measurement_is_what_teelab_measure_prints(
    authority: LabAuthority, guest: VMSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = EmulatedSnpBackend(policy=0x30000, authority=authority)
    with backend.attach(guest, tcg_host()) as attachment:
        assert attachment.measurement is not None and attachment.measurement.method == METHOD_LAB
        argv = ["measure", "--kind", "snp", "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
                "--cmdline", guest.cmdline, "--vcpus", str(guest.vcpus), "--json"]  # fmt: skip
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["measurement"] == attachment.measurement.measurement.hex()
        assert main([*argv[:-2], "3", "--json"]) == 0  # another vCPU count is another measurement
        assert json.loads(capsys.readouterr().out)["measurement"] != printed["measurement"]
    tdx = EmulatedTdxBackend(authority=backend.authority).attach(guest, tcg_host())
    assert main(["measure", "--kind", "tdx", "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
                 "--cmdline", guest.cmdline, "--vcpus", "2", "--json"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["mrtd"] == tdx.measurement.mrtd.hex()  # type: ignore[union-attr]
    assert [printed[f"rtmr{i}"] for i in range(4)] == [r.hex() for r in tdx.measurement.rtmrs]  # type: ignore


def test_measure_cli_reports_bad_input_with_a_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--kind", "snp", "--kernel", "/nonexistent/vmlinuz", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "E951"


def test_choice_by_host_probe() -> None:
    assert isinstance(choose_backend("snp", snp_host()), SnpBackend)
    assert isinstance(choose_backend("snp", tcg_host()), EmulatedSnpBackend)
    assert isinstance(choose_backend("snp", snp_host(), "emulated"), EmulatedSnpBackend)
    assert isinstance(choose_backend("tdx", tdx_host()), TdxBackend)
    assert isinstance(choose_backend("tdx", snp_host()), EmulatedTdxBackend)
    assert isinstance(choose_backend("nsm", snp_host()), EmulatedNsmBackend)
    no_qemu = replace(snp_host(), qemu=replace(snp_host().qemu, object_types=frozenset()))
    assert isinstance(choose_backend("snp", no_qemu), EmulatedSnpBackend)


def test_asking_for_real_hardware_on_a_tcg_host_says_what_is_missing() -> None:
    with pytest.raises(TeeUnavailable) as info:
        choose_backend("snp", tcg_host(), "real")
    missing = info.value.evidence["missing"]
    assert any("sev-snp-guest" in m for m in missing) and any("KVM" in m for m in missing)
    with pytest.raises(MeasureInputInvalid):
        choose_backend("sev", tcg_host())  # type: ignore[arg-type]
    assert "doctor --require snp" in (info.value.hint or "")


def test_one_spec_runs_real_or_emulated_with_its_policy_and_host_data(guest: VMSpec) -> None:
    spec = replace(guest, confidential=SevSnpGuest(policy=0x30001, host_data=b"\x07" * 32))
    emulated = backend_for_spec(spec, tcg_host())
    assert isinstance(emulated, EmulatedSnpBackend)
    assert (emulated.policy, emulated.host_data) == (0x30001, b"\x07" * 32)
    real = backend_for_spec(spec, snp_host(), firmware=FIXTURES / "ovmf_AmdSev_suffix.bin")
    assert isinstance(real, SnpBackend) and (real.policy, real.host_data) == (0x30001, b"\x07" * 32)
    tdx = backend_for_spec(replace(guest, confidential=TdxGuest(sept_ve_disable=False)), tcg_host())
    assert isinstance(tdx, EmulatedTdxBackend) and tdx.attributes == 0


class ScriptedMachine:
    """A launched machine whose QMP answers from a script."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.loop: EventLoopThread = shared_loop()

    def qmp(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        self.sent.append((command, arguments))
        return self.answers[command]

    def channel(self, chardev_id: str) -> socket.socket:
        raise AssertionError("a real guest has no tee channel")


QUERY_SEV_SNP = {"enabled": True, "api-major": 1, "api-minor": 55, "build-id": 21, "state": "running",
                 "sev-type": "sev-snp", "snp-policy": 0x30000}  # fmt: skip


@pytest.mark.parametrize(
    "answer, ok",
    [
        (QUERY_SEV_SNP, True),
        ({**QUERY_SEV_SNP, "snp-policy": 0xB0000}, False),
        ({**QUERY_SEV_SNP, "sev-type": "sev-es"}, False),
        ({"enabled": False}, False),
    ],
)
def test_real_snp_launch_check_reads_query_sev(guest: VMSpec, answer: dict[str, Any], ok: bool) -> None:
    attachment = SnpBackend(firmware=FIXTURES / "ovmf_AmdSev_suffix.bin").attach(guest, snp_host())
    machine = ScriptedMachine({"query-sev": answer})
    if ok:
        assert attachment.after_launch(machine)["sev-type"] == "sev-snp"
    else:
        with pytest.raises(TeeLaunchMismatch) as info:
            attachment.after_launch(machine)
        assert info.value.evidence["received"] == answer
    assert machine.sent == [("query-sev", {})]


def test_real_tdx_launch_check_finds_the_tdx_guest_object(guest: VMSpec, tmp_path: Path) -> None:
    (tmp_path / "OVMF.fd").write_bytes(b"tdvf")
    attachment = TdxBackend(firmware=tmp_path / "OVMF.fd").attach(guest, tdx_host())
    objects = [
        {"name": "tdx0", "type": "child<tdx-guest>"},
        {"name": "mem0", "type": "child<memory-backend-ram>"},
    ]
    assert attachment.after_launch(ScriptedMachine({"qom-list": objects}))["type"] == "child<tdx-guest>"
    with pytest.raises(TeeLaunchMismatch):
        attachment.after_launch(ScriptedMachine({"qom-list": objects[1:]}))


def test_emulated_after_launch_serves_the_port_channel(
    authority: LabAuthority, guest: VMSpec, tmp_path: Path
) -> None:
    from teelab_guest import tee_wire

    ours, theirs = socket.socketpair()

    class Launched(ScriptedMachine):
        def channel(self, chardev_id: str) -> socket.socket:
            assert chardev_id == "tee"
            return theirs

    backend = EmulatedTdxBackend(authority=authority)
    with backend.attach(guest, tcg_host()) as attachment:
        assert attachment.after_launch(Launched({})) == {
            "kind": "tdx",
            "emulated": True,
            "port": "org.teelab.tee.0",
        }
        ours.settimeout(10)
        answer = tee_wire.call(ours.makefile("rwb", buffering=0), tee_wire.Request(3, "describe"))  # type: ignore
        assert answer["kind"] == "tdx"
    assert ours.recv(1) == b""  # close() ended the service and closed its end
    ours.close()
