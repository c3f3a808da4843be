"""Impossible VM specs fail before QEMU starts, with a coded error that says what to change, and leave nothing
behind (no process, no artifact folder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_hosts import snp_host, tcg_host

from harness.qemu import (
    ChardevChannel,
    MemoryBackendFile,
    SevSnpGuest,
    TdxGuest,
    VhostVsockPci,
    VirtioRngPci,
    VirtioSerialPort,
    VMSpec,
)
from harness.qemu.errors import HugepagesShort, SpecError
from harness.qemu.machine import Machine


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    made = {name: tmp_path / name for name in ("vmlinuz", "initrd.img", "OVMF.fd")}
    for path in made.values():
        path.write_bytes(b"\0" * 16)
    return made


def spec(files: dict[str, Path], **changes: object) -> VMSpec:
    fields = {"name": "bad", "kernel": files["vmlinuz"], "initrd": files["initrd.img"], "memory_mib": 256}
    return VMSpec(**(fields | changes))  # type: ignore[arg-type]


class UnknownDevice(VirtioRngPci):
    qemu_type = "virtio-gpu-rainbow"


Case = Callable[[dict[str, Path], Path], tuple[VMSpec, object]]
CASES: dict[str, tuple[Case, str, str]] = {
    "zero vCPUs": (lambda f, t: (spec(f, vcpus=0), tcg_host()), "E301", "vcpus=0"),
    "memory below 64 MiB": (lambda f, t: (spec(f, memory_mib=32), tcg_host()), "E302", "below 64 MiB"),
    "unknown device": (lambda f, t: (spec(f, devices=(UnknownDevice("x0"),)), tcg_host()), "E311",
                       "virtio-gpu-rainbow"),
    "missing kernel": (lambda f, t: (spec(f, kernel=t / "no-such-vmlinuz"), tcg_host()), "E303",
                       "no-such-vmlinuz"),
    "hugepages where none are free": (
        lambda f, t: (
            spec(f, memory=MemoryBackendFile("ram0", 256, mem_path=t / "huge")),
            tcg_host(free_2m=10, hugetlbfs=(str(t / "huge"),)),
        ),
        "E309",
        "128 hugepages",
    ),
    "hugetlbfs not mounted": (
        lambda f, t: (
            spec(f, memory=MemoryBackendFile("ram0", 256, mem_path=t / "huge")),
            tcg_host(free_2m=500),
        ),
        "E308",
        "not a hugetlbfs mount",
    ),
    "SNP on a TCG host": (
        lambda f, t: (spec(f, confidential=SevSnpGuest(), firmware=f["OVMF.fd"]), tcg_host()),
        "E312",
        "no object type sev-snp-guest",
    ),
    "TDX on an SNP host": (
        lambda f, t: (spec(f, confidential=TdxGuest(), firmware=f["OVMF.fd"]), snp_host()),
        "E313",
        "tdx",
    ),
    "a port's chardev named like the machine's console": (
        lambda f, t: (spec(f, devices=(VirtioSerialPort("p0", "org.lab.0", ChardevChannel("console")),)),
                      tcg_host()),
        "E306",
        "'console'",
    ),
    "kernel vsock without /dev/vhost-vsock": (
        lambda f, t: (spec(f, devices=(VhostVsockPci("v0", guest_cid=5),)), tcg_host()),
        "E314",
        "/dev/vhost-vsock",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_impossible_specs_fail_before_anything_starts(
    case: str, files: dict[str, Path], tmp_path: Path, state_dir: Path
) -> None:
    make, code, words = CASES[case]
    bad, host = make(files, tmp_path)
    runs_before = set((state_dir / "runs").glob("*")) if (state_dir / "runs").exists() else set()
    with pytest.raises(SpecError) as caught:
        Machine(bad, host)  # type: ignore[arg-type]
    error = caught.value
    assert error.code == code, (case, error)
    assert words in error.message, error.message
    assert error.hint and error.exit_status == 2
    runs_after = set((state_dir / "runs").glob("*")) if (state_dir / "runs").exists() else set()
    assert runs_after == runs_before, "a refused spec left an artifact folder"


@pytest.mark.parametrize(
    ("binding", "knob"),
    [
        ({}, "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
        (
            {"host_nodes": (0,), "policy": "bind"},
            "/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages",
        ),
    ],
)
def test_a_hugepage_shortfall_says_which_pool_to_grow_and_to_what(
    binding: dict[str, object], knob: str, files: dict[str, Path], tmp_path: Path
) -> None:
    memory = MemoryBackendFile("ram0", 256, mem_path=tmp_path / "huge", **binding)  # type: ignore[arg-type]
    host = tcg_host(free_2m=10, total_2m=40, hugetlbfs=(str(tmp_path / "huge"),))
    with pytest.raises(HugepagesShort) as caught:
        spec(files, memory=memory).validate(host)
    assert caught.value.hint == f"reserve 118 more as root: echo 158 > {knob}"
