"""A parent's enclave pool without a VM: where its vCPUs run (strict, or overcommitted on a small host), its
ledger booking, and golden command lines for a parent with a pool and for a carved enclave."""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from qemu_hosts import tcg_host

from harness.cli import main
from harness.enclave import build_eif, errors, plan
from harness.enclave.carver import enclave_spec
from harness.enclave.pool import (
    MEMHP_ONLINE,
    EnclavePool,
    book_parent,
    boot_memory,
    cpu_release_mode,
    hugepage_lock,
    layout_parent,
    pool_summary,
    release_parent,
)
from harness.host.ledger import Ledger
from harness.host.model import HostCpu, HostInfo
from harness.qemu import ChardevSocket, MemoryBackendMemfd, VhostUserVsockPci, VMSpec, build_argv
from harness.qemu.errors import OptionInvalid

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "enclave"
QMP = ChardevSocket("qmp", fd=3)
CONSOLE = ChardevSocket("console", fd=4)


def smt_host(cores: int) -> HostInfo:
    cpus = tuple(HostCpu(c, c % cores, 0, 0, (c % cores, c % cores + cores)) for c in range(2 * cores))
    return replace(tcg_host(free_2m=1024), cpus=cpus)


def assert_golden(case: str, argv: list[str], tmp_path: Path) -> None:
    """Compare with tests/golden/enclave/<case>.txt (tmp_path as $TMP, memfd paths as $FD); rewrite with
    TEELAB_UPDATE_GOLDEN=1."""
    text = re.sub(r"/proc/\d+/fd/\d+", "$FD", "\n".join(argv).replace(str(tmp_path), "$TMP")) + "\n"
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("TEELAB_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_a_large_host_maps_one_vcpu_per_host_cpu_with_the_pool_on_whole_cores_away_from_cpu_0() -> None:
    layout = layout_parent(smt_host(4), "p", EnclavePool(cpu_count=2))
    assert not layout.overcommit and layout.reason.startswith("strict")
    assert layout.pool_vcpus == (2, 3)
    pool_cpus = {layout.vcpu_host[v] for v in layout.pool_vcpus}
    assert pool_cpus == {1, 5}  # core 1, both threads
    assert len(set(layout.vcpu_host.values())) == 4 and not {0, 4} & pool_cpus


def test_this_host_overcommits_and_says_so() -> None:
    layout = layout_parent(tcg_host(free_2m=1024), "p", EnclavePool())
    assert layout.overcommit and "overcommit" in layout.reason
    assert layout.vcpu_host == {0: 0, 1: 0, 2: 1, 3: 1}


def test_strict_mapping_on_too_small_a_host_is_refused_unless_overcommit() -> None:
    with pytest.raises(errors.PoolExhausted, match="overcommit=True"):
        layout_parent(tcg_host(), "p", EnclavePool(overcommit=False))
    with pytest.raises(errors.PoolExhausted, match="CPU 0"):
        layout_parent(smt_host(4), "p", EnclavePool(cpu_ids=(0, 4)))


def test_booking_claims_every_vcpu_and_page_and_release_drops_them(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    layout = layout_parent(smt_host(4), "p", EnclavePool(memory_mib=256))
    values = book_parent(ledger, layout)
    assert values == layout.vcpu_host
    assert len(ledger.claims("hugepages-2048kB")) == (512 + 256) // 2
    other = layout_parent(smt_host(4), "q", EnclavePool(memory_mib=256))
    with pytest.raises(Exception, match=f"held by parent:p@{os.getpid()}"):
        book_parent(ledger, other)  # the same host CPUs, strictly: all or nothing
    assert {c.owner.split(":")[1] for c in ledger.claims()} == {layout.holder}
    release_parent(ledger, layout.holder)
    assert ledger.claims() == []


def test_parent_with_a_pool_command_line(tmp_path: Path) -> None:
    host = tcg_host(free_2m=1024)
    layout = layout_parent(host, "parent", EnclavePool())
    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    vsock = VhostUserVsockPci("vsock0", chardev=ChardevSocket("vsock0-chr", path=tmp_path / "parent.vhost"))
    spec = VMSpec(
        name="parent", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
        cmdline=f"console=ttyS0 teelab.role=parent {MEMHP_ONLINE}", vcpus=2, max_vcpus=4, memory_mib=512,
        memory=boot_memory(layout), devices=(*layout.devices, vsock),
    )  # fmt: skip
    assert_golden("parent_pool", build_argv(spec, host, qmp=QMP, console=CONSOLE), tmp_path)


def test_carved_enclave_command_line(tmp_path: Path) -> None:
    host = tcg_host(free_2m=1024)
    (tmp_path / "bzImage").write_bytes(b"k" * 4096)
    (tmp_path / "init.cpio").write_bytes(b"i" * 4096)
    eif = tmp_path / "app.eif"
    build_eif(eif, kernel=tmp_path / "bzImage", cmdline="console=ttyS0 teelab.role=enclave",
              ramdisks=[tmp_path / "init.cpio"], name="app")  # fmt: skip
    vsock = VhostUserVsockPci("vsock0", chardev=ChardevSocket("vsock0-chr", path=tmp_path / "enc.vhost"))
    with plan.plan_enclave(eif, host=host, vcpus=2, memory_mib=256, agent=False, name="enc") as launch:
        spec = enclave_spec(launch.spec, 256, 2048, (vsock,))
        argv = build_argv(spec, host, qmp=QMP, console=CONSOLE, channels={"tee": 5}, serial=False)
        debug = build_argv(spec, host, qmp=QMP, console=CONSOLE, channels={"tee": 5})
    assert_golden("carved_enclave", argv, tmp_path)  # production: no serial port, no console
    assert [a for a in debug if a not in argv] == ["-serial", "chardev:console"]


def test_doctor_says_which_mapping_a_pool_gets_here() -> None:

    small = pool_summary(tcg_host())
    assert small["mapping"] == "overcommit" and small["cpu_release"] == "offline"  # QEMU 7.2 under TCG
    assert pool_summary(smt_host(4))["mapping"] == "strict"
    one = replace(tcg_host(), cpus=(HostCpu(0, 0, 0, 0, (0,)),))
    assert pool_summary(one)["mapping"] == "unavailable"


def test_hugepage_memory_binds_one_node_the_host_has() -> None:
    host = tcg_host(free_2m=1024)
    for wrong in ({"host_nodes": (1,), "policy": "bind"}, {"host_nodes": (0,)}, {"policy": "bind"}):
        with pytest.raises(OptionInvalid):
            MemoryBackendMemfd("ram0", 256, hugetlb=True, **wrong).validate(host)  # type: ignore[arg-type]
    bound = MemoryBackendMemfd("ram0", 256, hugetlb=True, host_nodes=(0,), policy="bind")
    bound.validate(host)
    assert bound.hugepage_demand().nodes == (0,)  # type: ignore[union-attr]


def test_releasing_a_parent_leaves_a_same_named_parent_of_another_process(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    layout = layout_parent(tcg_host(free_2m=1024), "parent", EnclavePool())
    ledger.claim("cpu-slot", range(1000, 1001), 1, "parent:parent@1:vcpu0")  # another pytest worker's
    book_parent(ledger, layout)
    release_parent(ledger, layout.holder)
    assert [c.owner for c in ledger.claims()] == ["parent:parent@1:vcpu0"]


def test_the_hugepage_lock_keeps_a_second_lab_waiting_until_the_first_has_its_pages(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    order: list[str] = []

    def second() -> None:
        with hugepage_lock(ledger):
            order.append("second")

    with hugepage_lock(ledger):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]


@pytest.mark.parametrize("runs", ["0", "-1", "x"])
def test_bench_carve_refuses_a_run_count_below_one_before_booting_anything(
    runs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "carve", "-n", runs]) == 2
    captured = capsys.readouterr()
    assert "E102" in captured.err + captured.out


def test_vcpus_are_unplugged_where_qemu_can_plug_them_back() -> None:
    host = tcg_host()
    assert cpu_release_mode(host) == "offline"  # QEMU 7.2 under TCG crashes on a CPU device_add after a del
    assert cpu_release_mode(replace(host, qemu=replace(host.qemu, version=(8, 2, 0)))) == "unplug"
    assert cpu_release_mode(replace(host, accel="kvm")) == "unplug"
