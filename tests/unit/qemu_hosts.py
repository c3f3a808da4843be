"""HostInfo values for the QEMU unit tests: this TCG machine, an SEV-SNP host, a TDX host."""

from __future__ import annotations

from dataclasses import replace

from harness.host.model import (
    HostCpu,
    HostInfo,
    HugepagePool,
    HugetlbfsMount,
    LibvirtInfo,
    QemuInfo,
    TeeSupport,
)

OBJECTS_7_2 = frozenset(
    {"memory-backend-ram", "memory-backend-memfd", "memory-backend-file", "sev-guest", "rng-random"}
)
DEVICES_7_2 = frozenset(
    {
        "vhost-vsock-pci",
        "vhost-user-vsock-pci",
        "virtio-mem-pci",
        "pc-dimm",
        "virtio-serial-pci",
        "virtserialport",
        "virtio-rng-pci",
        "max-x86_64-cpu",
        "tpm-crb",
        "virtio-blk-pci",
        "virtio-net-pci",
    }
)
MACHINES = frozenset({"q35", "pc", "microvm", "none"})
TCG_REASON = "no vmx or svm in /proc/cpuinfo flags (PVM-based KVM): using TCG"


def _cpus(count: int) -> tuple[HostCpu, ...]:
    return tuple(HostCpu(cpu=i, core=i, package=0, node=0, siblings=(i,)) for i in range(count))


def tcg_host(
    *,
    free_2m: int = 0,
    total_2m: int | None = None,
    hugetlbfs: tuple[str, ...] = (),
    vhost_vsock: bool = False,
) -> HostInfo:
    """Like the CI machine: TCG, QEMU 7.2 without sev-snp-guest or tdx-guest, no /dev/vhost-vsock."""
    return HostInfo(
        accel="tcg",
        accel_reason=TCG_REASON,
        kvm_device=True,
        vhost_vsock=vhost_vsock,
        cpus=_cpus(2),
        hugepages=(HugepagePool(2048, 0, free_2m if total_2m is None else total_2m, free_2m),),
        hugetlbfs=tuple(HugetlbfsMount(path, 2048) for path in hugetlbfs),
        tee=TeeSupport(),
        qemu=QemuInfo("qemu-system-x86_64", (7, 2, 22), OBJECTS_7_2, DEVICES_7_2, MACHINES),
        libvirt=LibvirtInfo(available=False, reason="libvirtd not running"),
        cpu_flags=frozenset({"sse4_2", "avx2"}),
    )


def snp_host() -> HostInfo:
    """An AMD host with SEV-SNP enabled and QEMU 9.2."""
    host = tcg_host(vhost_vsock=True)
    return replace(
        host,
        accel="kvm",
        accel_reason="svm in /proc/cpuinfo and /dev/kvm is read-write",
        tee=TeeSupport(sev=True, sev_es=True, sev_snp=True, cbitpos=51, reduced_phys_bits=1),
        qemu=replace(host.qemu, version=(9, 2, 0), object_types=OBJECTS_7_2 | {"sev-snp-guest"}),
        cpu_flags=frozenset({"svm", "sev", "sev_es", "sev_snp"}),
    )


def tdx_host() -> HostInfo:
    """An Intel host with TDX enabled and QEMU 10.1."""
    host = tcg_host(vhost_vsock=True)
    return replace(
        host,
        accel="kvm",
        accel_reason="vmx in /proc/cpuinfo and /dev/kvm is read-write",
        tee=TeeSupport(tdx=True),
        qemu=replace(host.qemu, version=(10, 1, 0), object_types=OBJECTS_7_2 | {"tdx-guest"}),
        cpu_flags=frozenset({"vmx", "tdx_host_platform"}),
    )
