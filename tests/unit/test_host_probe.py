"""The host probe against fixture trees (SNP, TDX, two-node SMT, PVM-KVM) and against this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from host_trees import PVM_HOST, SNP_HOST, TDX_HOST, TWO_NODE_SMT_HOST, HostTree

from harness.host import hugepages
from harness.host.errors import HugepageReserveFailed
from harness.host.probe import choose_accel, parse_cpu_list, parse_size_kib, probe


@pytest.fixture
def tree(tmp_path: Path):
    def make(host: HostTree) -> Path:
        return host.write(tmp_path / "host")

    return make


def test_snp_host_reports_snp_kvm_and_the_c_bit(tree) -> None:
    host = probe(tree(SNP_HOST))
    assert host.accel == "kvm" and "svm" in host.accel_reason
    assert host.tee.sev and host.tee.sev_es and host.tee.sev_snp and not host.tee.tdx
    assert (host.tee.cbitpos, host.tee.reduced_phys_bits) == (51, 1)
    assert host.qemu.version == (9, 2, 0)
    assert host.qemu.has("sev-snp-guest") and not host.qemu.has("tdx-guest")
    assert host.vhost_vsock


def test_tdx_host_reports_tdx_and_its_qemu_object(tree) -> None:
    host = probe(tree(TDX_HOST))
    assert host.accel == "kvm" and "vmx" in host.accel_reason
    assert host.tee.tdx and not host.tee.sev_snp
    assert host.tee.cbitpos is None
    assert host.qemu.version == (10, 1, 0) and host.qemu.has("tdx-guest")


def test_two_node_smt_host_has_siblings_nodes_and_per_node_hugepages(tree) -> None:
    host = probe(tree(TWO_NODE_SMT_HOST))
    assert host.numa_nodes == (0, 1)
    assert len(host.cpus) == 16
    by_cpu = {c.cpu: c for c in host.cpus}
    assert by_cpu[0].siblings == (0, 8) and by_cpu[8].siblings == (0, 8)
    assert by_cpu[5].node == 1 and by_cpu[13].node == 1 and by_cpu[3].node == 0
    assert by_cpu[5].package == 1 and by_cpu[5].core == 1
    assert not by_cpu[15].online and by_cpu[14].online
    assert host.free_hugepages(2048, 0) == 500
    assert host.free_hugepages(2048, 1) == 256
    assert host.free_hugepages(2048) == 756


def test_kvm_device_without_vmx_or_svm_means_tcg_with_the_reason(tree) -> None:
    host = probe(tree(PVM_HOST))
    assert host.kvm_device
    assert host.accel == "tcg"
    assert "no vmx or svm" in host.accel_reason


def test_missing_files_read_as_absent_capabilities(tmp_path: Path) -> None:
    host = probe(tmp_path)
    assert host.accel == "tcg" and not host.kvm_device and not host.vhost_vsock
    assert host.qemu.binary is None and host.qemu.version is None
    assert host.cpus == () and host.hugepages == () and host.hugetlbfs == ()


def test_hugetlbfs_mounts_come_with_their_page_size(tree) -> None:
    host = probe(tree(HostTree(hugetlbfs=("/run/teelab/hugepages-2M",))))
    assert [(m.path, m.pagesize_kib) for m in host.hugetlbfs] == [("/run/teelab/hugepages-2M", 2048)]
    assert host.hugetlbfs_mount(2048) is not None and host.hugetlbfs_mount(1048576) is None


def test_qemu_firmware_blobs_are_found_in_its_data_dir(tree) -> None:
    root = tree(HostTree())
    host = probe(root)
    assert host.qemu.firmware("qboot.rom") == str(root / "usr/share/qemu/qboot.rom")
    assert host.qemu.firmware("no-such.rom") is None


@pytest.mark.parametrize(
    ("flags", "kvm", "accel"),
    [
        ({"vmx"}, True, "kvm"),
        ({"svm"}, True, "kvm"),
        ({"vmx"}, False, "tcg"),
        (set(), True, "tcg"),
        (set(), False, "tcg"),
    ],
)
def test_accel_choice(flags: set[str], kvm: bool, accel: str) -> None:
    chosen, reason = choose_accel(frozenset(flags), kvm)
    assert chosen == accel and reason


def test_parsers() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("") == ()
    assert [parse_size_kib(s) for s in ("2M", "1G", "2048k", "4194304")] == [2048, 1048576, 2048, 4096]
    with pytest.raises(ValueError):
        parse_size_kib("lots")


def test_this_machine_matches_what_the_kernel_says() -> None:
    host = probe()
    online = {c.cpu for c in host.cpus if c.online}
    assert online == set(range(os.cpu_count() or 0)) or online >= os.sched_getaffinity(0)
    flags = Path("/proc/cpuinfo").read_text()
    assert (host.accel == "kvm") == (
        ("vmx" in flags or "svm" in flags) and os.access("/dev/kvm", os.R_OK | os.W_OK)
    )
    assert host.vhost_vsock == Path("/dev/vhost-vsock").exists()
    assert host.qemu.binary is not None and host.qemu.has("virtio-serial-pci")


def test_doctor_json_is_the_probe(tree) -> None:
    root = tree(TWO_NODE_SMT_HOST)
    done = subprocess.run([sys.executable, "-m", "harness.cli", "doctor", "--json", "--root", str(root)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    data = json.loads(done.stdout)
    assert data["accel"] == "kvm" and data["numa_nodes"] == [0, 1] and len(data["cpus"]) == 16
    assert "qboot.rom" in data["qemu"]["firmware_files"]


@pytest.mark.root
def test_growing_a_pool_the_kernel_does_not_have_is_a_coded_error() -> None:
    with pytest.raises(HugepageReserveFailed) as caught:
        hugepages.ensure_pool(4, 1)  # no kernel has 4 KiB hugepages, so there is no such pool
    assert caught.value.code == "E202" and "hugepages-4kB" in caught.value.hint


def test_a_stale_libvirt_socket_is_not_a_running_libvirtd(tmp_path: Path) -> None:
    """A socket file left by a dead daemon (or baked into a container image) refuses every connection."""
    import socket

    from harness.host.probe import libvirt_info, socket_answers

    pytest.importorskip("libvirt")
    sock = tmp_path / "run/libvirt/libvirt-sock"
    sock.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(sock))  # bound, never listening: the file stays, connections are refused
    assert sock.exists() and not socket_answers(sock)
    stale = libvirt_info(tmp_path)
    assert not stale.available and "stale socket" in stale.reason
    sock.unlink()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(sock))
        live.listen()
        assert socket_answers(sock) and libvirt_info(tmp_path).available
