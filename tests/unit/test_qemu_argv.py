"""Golden command lines from build_argv: one argument per line in tests/golden/qemu/<case>.txt."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_hosts import snp_host, tcg_host, tdx_host

from harness.host.model import HostInfo
from harness.qemu import (
    ChardevFile,
    ChardevSocket,
    ChardevStdio,
    MemoryBackendFile,
    MemoryBackendMemfd,
    MemoryBackendRam,
    SevSnpGuest,
    SpecError,
    TdxGuest,
    TpmCrb,
    VhostUserVsockPci,
    VhostVsockPci,
    VirtioBlkPci,
    VirtioMemPci,
    VirtioRngPci,
    VirtioSerialPort,
    VMSpec,
    build_argv,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "qemu"
QMP = ChardevSocket("qmp", fd=3)
CONSOLE = ChardevSocket("console", fd=4)


def assert_golden(case: str, argv: list[str], tmp_path: Path) -> None:
    """Compare with the golden file (tmp_path shown as $TMP); TEELAB_UPDATE_GOLDEN=1 rewrites it."""
    text = "\n".join(argv).replace(str(tmp_path), "$TMP") + "\n"
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("TEELAB_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.fixture
def boot(tmp_path: Path) -> dict[str, Path]:
    """A kernel, an initrd and a firmware file under tmp_path."""
    files = {name: tmp_path / name for name in ("vmlinuz", "initrd.img", "OVMF.fd")}
    for path in files.values():
        path.write_bytes(b"\0" * 16)
    return files


def disk_image(tmp_path: Path) -> Path:
    path = tmp_path / "data.img"
    path.write_bytes(bytes(4096))
    return path


def plain(boot: dict[str, Path], **changes: object) -> VMSpec:
    spec = dict(name="guest", kernel=boot["vmlinuz"], initrd=boot["initrd.img"], cmdline="console=ttyS0")
    return VMSpec(**(spec | changes))  # type: ignore[arg-type]


Case = Callable[[dict[str, Path], Path], tuple[VMSpec, HostInfo]]

CASES: dict[str, Case] = {
    "plain_tcg": lambda b, t: (
        plain(b, vcpus=2, memory_mib=256, devices=(VirtioRngPci("rng0"),)),
        tcg_host(),
    ),
    "hugetlbfs_bind": lambda b, t: (
        plain(
            b,
            vcpus=2,
            max_vcpus=4,
            memory_mib=512,
            memory=MemoryBackendFile("ram0", 512, mem_path=t / "huge", host_nodes=(0,), policy="bind"),
        ),
        tcg_host(free_2m=300, hugetlbfs=(str(t / "huge"),)),
    ),
    "vhost_vsock": lambda b, t: (
        plain(b, devices=(VhostVsockPci("vsock0", guest_cid=16),)),
        tcg_host(vhost_vsock=True),
    ),
    "vhost_user_vsock": lambda b, t: (
        plain(
            b,
            memory=MemoryBackendMemfd("ram0", 256),
            devices=(VhostUserVsockPci("vsock0", ChardevSocket("vsock0-chr", path=t / "vsock.sock")),),
        ),
        tcg_host(),
    ),
    "virtio_serial": lambda b, t: (
        plain(
            b,
            devices=(
                VirtioSerialPort(
                    "tee0", "org.teelab.tee.0", ChardevSocket("tee0-chr", path=t / "tee.sock", server=True)
                ),
                VirtioSerialPort("log0", "org.teelab.log.0", ChardevFile("log0-chr", t / "guest.log")),
            ),
        ),
        tcg_host(),
    ),
    "virtio_mem": lambda b, t: (
        plain(
            b,
            memory=MemoryBackendMemfd("ram0", 256),
            devices=(VirtioMemPci("vmem0", MemoryBackendMemfd("vmem0-mem", 1024), requested_size_mib=128),),
        ),
        tcg_host(),
    ),
    "tpm_crb": lambda b, t: (
        plain(b, devices=(TpmCrb("tpm0", ChardevSocket("tpm0-chr", path=t / "swtpm.sock")),)),
        tcg_host(),
    ),
    "virtio_blk": lambda b, t: (
        plain(b, devices=(VirtioBlkPci("disk0", disk_image(t)),)),
        tcg_host(),
    ),
    "sev_snp": lambda b, t: (
        plain(
            b,
            memory_mib=2048,
            memory=MemoryBackendMemfd("ram1", 2048),
            confidential=SevSnpGuest(),
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
            confidential=TdxGuest(quote_generation_socket=(2, 4050)),
            firmware=b["OVMF.fd"],
        ),
        tdx_host(),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_argv_matches_golden(case: str, boot: dict[str, Path], tmp_path: Path) -> None:
    spec, host = CASES[case](boot, tmp_path)
    argv = build_argv(spec, host, qmp=QMP, console=CONSOLE)
    assert argv == build_argv(spec, host, qmp=QMP, console=CONSOLE)
    assert_golden(case, argv, tmp_path)


def _options(argv: list[str], flag: str, first: str) -> set[str]:
    """The comma-separated options of the ``flag`` argument that starts with ``first``."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag and argv[i + 1].startswith(first)]
    assert len(values) == 1, (flag, first, values)
    return set(values[0].split(","))


def test_snp_argv_carries_every_option_of_the_reference(boot: dict[str, Path], tmp_path: Path) -> None:
    spec, host = CASES["sev_snp"](boot, tmp_path)
    argv = build_argv(spec, host, qmp=QMP, console=CONSOLE)
    assert _options(argv, "-machine", "q35") == {
        "q35",
        "confidential-guest-support=sev0",
        "memory-backend=ram1",
    }
    assert _options(argv, "-object", "memory-backend-memfd") == {
        "memory-backend-memfd", "id=ram1", "size=2G", "share=true"
    }  # fmt: skip
    assert _options(argv, "-object", "sev-snp-guest") == {
        "sev-snp-guest", "id=sev0", "cbitpos=51", "reduced-phys-bits=1", "policy=0x30000", "kernel-hashes=on"
    }  # fmt: skip
    assert argv[argv.index("-bios") + 1] == str(boot["OVMF.fd"])
    assert argv[argv.index("-cpu") + 1] == "EPYC-v4"
    assert argv[argv.index("-accel") + 1] == "kvm"


def test_snp_host_data_is_base64(boot: dict[str, Path], tmp_path: Path) -> None:
    spec, host = CASES["sev_snp"](boot, tmp_path)
    guest = SevSnpGuest(host_data=bytes(32))
    argv = build_argv(VMSpec(**{**spec.__dict__, "confidential": guest}), host, qmp=QMP, console=CONSOLE)
    assert "host-data=" + "A" * 43 + "=" in _options(argv, "-object", "sev-snp-guest")


def test_tdx_argv_carries_every_option_of_the_reference(boot: dict[str, Path], tmp_path: Path) -> None:
    spec, host = CASES["tdx"](boot, tmp_path)
    argv = build_argv(spec, host, qmp=QMP, console=CONSOLE)
    assert _options(argv, "-machine", "q35") == {
        "q35", "kernel-irqchip=split", "confidential-guest-support=tdx0", "memory-backend=mem0", "hpet=off"
    }  # fmt: skip
    assert _options(argv, "-object", "memory-backend-ram") == {"memory-backend-ram", "id=mem0", "size=2G"}
    tdx_object = next(a for a in argv if a.startswith('{"qom-type":"tdx-guest"'))
    assert '"quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}' in tdx_object
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "-nodefaults" in argv


def test_run_by_hand_chardevs_listen_on_a_path_and_use_stdio(boot: dict[str, Path]) -> None:
    qmp = ChardevSocket("qmp", path=Path("qmp.sock"), server=True, wait=False)
    argv = build_argv(plain(boot), tcg_host(), qmp=qmp, console=ChardevStdio("console"))
    tail = argv[argv.index("-no-reboot") + 1 :]
    assert tail == [
        "-chardev", "socket,id=qmp,path=qmp.sock,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
    ]  # fmt: skip


def test_binary_comes_from_the_caller_then_the_probe_then_the_default(boot: dict[str, Path]) -> None:
    spec, host = plain(boot), tcg_host()
    assert build_argv(spec, host, qmp=QMP, console=CONSOLE, qemu_binary="/opt/q")[0] == "/opt/q"
    assert build_argv(spec, host, qmp=QMP, console=CONSOLE)[0] == "qemu-system-x86_64"
    from dataclasses import replace

    no_binary = replace(host, qemu=replace(host.qemu, binary=None))
    assert build_argv(spec, no_binary, qmp=QMP, console=CONSOLE)[0] == "qemu-system-x86_64"


def test_commas_in_paths_are_doubled(tmp_path: Path, boot: dict[str, Path]) -> None:
    chardev = ChardevSocket("tee0-chr", path=tmp_path / "a,b.sock")
    spec = plain(boot, devices=(VirtioSerialPort("tee0", "org.teelab.tee.0", chardev),))
    argv = build_argv(spec, tcg_host(), qmp=QMP, console=CONSOLE)
    assert f"socket,id=tee0-chr,path={tmp_path}/a,,b.sock" in argv


def test_explicit_tcg_on_a_kvm_host_uses_max_cpu_and_multithreaded_tcg(boot: dict[str, Path]) -> None:
    argv = build_argv(plain(boot, accel="tcg"), snp_host(), qmp=QMP, console=CONSOLE)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-cpu") + 1] == "max"


@pytest.mark.parametrize(
    "chardev",
    [ChardevSocket("tpm0-chr", fd=5), ChardevSocket("tpm0-chr", path=Path("t.sock"), server=True)],
    ids=["fd", "server"],
)
def test_tpm_emulator_needs_a_client_socket_path(boot: dict[str, Path], chardev: ChardevSocket) -> None:
    spec = plain(boot, devices=(TpmCrb("tpm0", chardev),))
    with pytest.raises(SpecError) as err:
        build_argv(spec, tcg_host(), qmp=QMP, console=CONSOLE)
    assert err.value.code == "E315" and "client socket" in str(err.value)


def test_a_disk_image_must_exist(boot: dict[str, Path], tmp_path: Path) -> None:
    spec = plain(boot, devices=(VirtioBlkPci("disk0", tmp_path / "absent.img"),))
    with pytest.raises(SpecError) as err:
        build_argv(spec, tcg_host(), qmp=QMP, console=CONSOLE)
    assert err.value.code == "E303" and "absent.img" in str(err.value)
