"""Golden domain XML from domain_xml: tests/golden/libvirt/<case>.xml, checked against libvirt's own schema
where the installed libvirt knows the elements, and the parts the backend refuses, each with its code."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_hosts import snp_host, tcg_host, tdx_host

from harness.host.model import HostInfo
from harness.libvirt import LibvirtUnsupported, domain_xml
from harness.qemu import (
    ChardevChannel,
    ChardevFile,
    ChardevSocket,
    MemoryBackendFile,
    MemoryBackendMemfd,
    MemoryBackendRam,
    SevSnpGuest,
    TdxGuest,
    TpmCrb,
    VhostUserVsockPci,
    VhostVsockPci,
    VirtioBlkPci,
    VirtioMemPci,
    VirtioRngPci,
    VirtioSerialPort,
    VMSpec,
    X86Cpu,
)
from harness.qemu.devices import VirtioNetUser

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "libvirt"
OWNER = (0, 0)
EMULATOR = "/usr/bin/qemu-system-x86_64"
# The installed libvirt (9.0) predates <launchSecurity type='sev-snp'> (10.5) and type='tdx' (11.x).
NEWER_THAN_SCHEMA = {"sev_snp", "tdx"}


@pytest.fixture
def boot(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / name for name in ("vmlinuz", "initrd.img", "OVMF.fd", "data.img")}
    for path in files.values():
        path.write_bytes(b"\0" * 4096)
    return files


def plain(boot: dict[str, Path], **changes: object) -> VMSpec:
    spec = dict(name="guest", kernel=boot["vmlinuz"], initrd=boot["initrd.img"], cmdline="console=ttyS0")
    return VMSpec(**(spec | changes))  # type: ignore[arg-type]


Case = Callable[[dict[str, Path], Path], tuple[VMSpec, HostInfo]]
CASES: dict[str, Case] = {
    "plain_tcg": lambda b, t: (
        plain(b, vcpus=2, devices=(VirtioRngPci("rng0"),), firmware=b["OVMF.fd"]),
        tcg_host(),
    ),
    "agent_and_vhost_user_vsock": lambda b, t: (
        plain(
            b,
            memory=MemoryBackendMemfd("ram0", 256),
            devices=(
                VirtioSerialPort("agent0", "org.teelab.agent.0", ChardevChannel("agent")),
                VhostUserVsockPci("vsock0", ChardevSocket("vsock0-chr", path=t / "vsock.sock")),
            ),
        ),
        tcg_host(),
    ),
    "hugepages_numa": lambda b, t: (
        plain(
            b,
            vcpus=2,
            max_vcpus=4,
            memory_mib=512,
            memory=MemoryBackendMemfd(
                "ram0", 512, hugetlb=True, prealloc=True, host_nodes=(0,), policy="bind"
            ),
        ),
        tcg_host(free_2m=300),
    ),
    "hugetlbfs_file": lambda b, t: (
        plain(b, memory_mib=512, memory=MemoryBackendFile("ram0", 512, mem_path=t / "huge")),
        tcg_host(free_2m=300, hugetlbfs=(str(t / "huge"),)),
    ),
    "kernel_vsock_disk_tpm_file_port": lambda b, t: (
        plain(
            b,
            devices=(
                VhostVsockPci("vsock0", guest_cid=16),
                VirtioBlkPci("disk0", b["data.img"], read_only=True),
                TpmCrb("tpm0", ChardevSocket("tpm0-chr", path=t / "swtpm.sock")),
                VirtioSerialPort("log0", "org.teelab.log.0", ChardevFile("log0-chr", t / "guest.log")),
            ),
        ),
        tcg_host(vhost_vsock=True),
    ),
    "ssh_nic": lambda b, t: (
        plain(
            b,
            memory=MemoryBackendMemfd("ram0", 256),
            devices=(
                VhostUserVsockPci("vsock0", ChardevSocket("vsock0-chr", path=t / "vsock.sock")),
                VirtioNetUser("net0", host_port=2222),
            ),
        ),
        tcg_host(),
    ),
    "sev_snp": lambda b, t: (
        plain(
            b,
            memory_mib=2048,
            memory=MemoryBackendMemfd("ram1", 2048),
            confidential=SevSnpGuest(host_data=bytes(range(32))),
            firmware=b["OVMF.fd"],
            cpu_model="EPYC-v4",
        ),
        snp_host(),
    ),
    "tdx": lambda b, t: (
        plain(
            b,
            memory_mib=2048,
            memory=MemoryBackendRam("mem0", 2048),
            confidential=TdxGuest(
                quote_generation_socket=Path("/var/run/tdx-qgs/qgs.socket"), mrowner=bytes(48)
            ),
            firmware=b["OVMF.fd"],
        ),
        tdx_host(),
    ),
}


def render(case: str, boot: dict[str, Path], tmp_path: Path, **options: object) -> str:
    spec, host = CASES[case](boot, tmp_path)
    return domain_xml(
        spec, host, name=f"teelab-{case}", run_dir=tmp_path / "run", owner=OWNER, emulator=EMULATOR, **options
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(CASES))
def test_domain_xml_matches_golden(case: str, boot: dict[str, Path], tmp_path: Path) -> None:
    xml = render(case, boot, tmp_path, vcpu_pins={0: 1, 1: 0} if case == "hugepages_numa" else None)
    text = xml.replace(str(tmp_path), "$TMP")
    golden = GOLDEN / f"{case}.xml"
    if os.environ.get("TEELAB_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    if case not in NEWER_THAN_SCHEMA:
        libvirt = pytest.importorskip("libvirt")
        conn = libvirt.open("test:///default")  # libvirt's in-process test driver: no daemon
        try:  # VALIDATE: checked against the installed libvirt's RelaxNG schema of domain XML
            conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE).undefine()
        finally:
            conn.close()


def test_qemu_commandline_holds_only_vhost_user_vsock(boot: dict[str, Path], tmp_path: Path) -> None:
    assert "qemu:commandline" not in render("plain_tcg", boot, tmp_path)
    xml = render("agent_and_vhost_user_vsock", boot, tmp_path)
    assert xml.count("<qemu:arg ") == 4 and "vhost-user-vsock-pci,id=vsock0,chardev=vsock0-chr" in xml


def test_a_harness_channel_is_a_socket_in_the_run_dir(boot: dict[str, Path], tmp_path: Path) -> None:
    xml = render("agent_and_vhost_user_vsock", boot, tmp_path)
    assert f'<source mode="bind" path="{tmp_path}/run/agent.sock" />' in xml
    assert f'<source mode="bind" path="{tmp_path}/run/console.sock" />' in xml
    assert "<serial " not in render("plain_tcg", boot, tmp_path, serial=False)


REFUSED = {
    "vcpu device": lambda b, t: X86Cpu("cpu2", socket_id=2),
    "virtio-mem": lambda b, t: VirtioMemPci(
        "vmem0", MemoryBackendMemfd("vmem0-mem", 512), requested_size_mib=0
    ),
    "vhost-user on a socketpair": lambda b, t: VhostUserVsockPci("vsock0", ChardevChannel("vsock0-chr")),
    "inherited fd": lambda b, t: VirtioSerialPort("p0", "org.p.0", ChardevSocket("p0-chr", fd=5)),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_parts_libvirt_cannot_express_are_refused_with_e316(
    what: str, boot: dict[str, Path], tmp_path: Path
) -> None:
    memory = MemoryBackendMemfd("ram0", 256)
    spec = plain(boot, memory=memory, max_vcpus=4, devices=(REFUSED[what](boot, tmp_path),))
    with pytest.raises(LibvirtUnsupported) as caught:
        domain_xml(spec, tcg_host(), name="x", run_dir=tmp_path, owner=OWNER)
    assert caught.value.code == "E360" and caught.value.hint


def test_tdx_quote_service_over_vsock_is_refused(boot: dict[str, Path], tmp_path: Path) -> None:
    spec, host = CASES["tdx"](boot, tmp_path)
    spec = VMSpec(**{**spec.__dict__, "confidential": TdxGuest(quote_generation_socket=(2, 4050))})
    with pytest.raises(LibvirtUnsupported, match="Unix socket only"):
        domain_xml(spec, host, name="x", run_dir=tmp_path, owner=OWNER)


def test_a_bad_spec_keeps_its_qemu_layer_code(boot: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(Exception) as caught:
        domain_xml(plain(boot, vcpus=0), tcg_host(), name="x", run_dir=tmp_path, owner=OWNER)
    assert getattr(caught.value, "code", None) == "E301"
