"""What the host probe reports: plain frozen dataclasses, no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Accel = Literal["kvm", "tcg"]


def size_text(kib: int) -> str:
    """``1G``, ``2M`` or ``4K``: the largest exact unit, as QEMU and ``mount -o pagesize=`` spell sizes."""
    for unit, factor in (("G", 1024 * 1024), ("M", 1024)):
        if kib % factor == 0:
            return f"{kib // factor}{unit}"
    return f"{kib}K"


@dataclass(frozen=True)
class HugepagePool:
    """Hugepages of one size on one NUMA node (node None: the system-wide pool)."""

    size_kib: int
    node: int | None
    total: int
    free: int


@dataclass(frozen=True)
class HugetlbfsMount:
    path: str
    pagesize_kib: int


@dataclass(frozen=True)
class HostCpu:
    """One logical CPU: its core, package, NUMA node and SMT siblings (including itself)."""

    cpu: int
    core: int
    package: int
    node: int
    siblings: tuple[int, ...]
    online: bool = True


@dataclass(frozen=True)
class EpcSection:
    """SGX enclave page cache on one NUMA node (the kernel's nodeN/x86/sgx_total_bytes)."""

    node: int
    size_kib: int


@dataclass(frozen=True)
class TeeSupport:
    """Confidential-computing support of the host kernel and firmware. SGX: the CPU flag, flexible launch
    control (``sgx_lc``), /dev/sgx_vepc (EPC for guests) and the EPC sections per node."""

    sev: bool = False
    sev_es: bool = False
    sev_snp: bool = False
    tdx: bool = False
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    sgx: bool = False
    sgx_flc: bool = False
    sgx_vepc: bool = False
    sgx_epc: tuple[EpcSection, ...] = ()

    def epc_kib(self, node: int) -> int:
        """The EPC on ``node`` in KiB (0 when it has none)."""
        return sum(section.size_kib for section in self.sgx_epc if section.node == node)


@dataclass(frozen=True)
class QemuInfo:
    """The QEMU binary found, its version and the -object / -device types it offers."""

    binary: str | None
    version: tuple[int, int, int] | None
    object_types: frozenset[str] = frozenset()
    device_types: frozenset[str] = frozenset()
    machine_types: frozenset[str] = frozenset()
    data_dir: str | None = None  # where QEMU keeps its firmware blobs
    firmware_files: frozenset[str] = frozenset()  # the blobs found there (qboot.rom, bios-256k.bin, ...)

    def has(self, type_name: str) -> bool:
        return type_name in self.object_types or type_name in self.device_types

    def firmware(self, name: str) -> str | None:
        """The path of a firmware blob QEMU ships (``qboot.rom``), or None."""
        return f"{self.data_dir}/{name}" if self.data_dir and name in self.firmware_files else None


@dataclass(frozen=True)
class LibvirtInfo:
    available: bool
    version: str | None = None
    uri: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class HostInfo:
    """Everything the harness needs to know about the host before building a VM."""

    accel: Accel
    accel_reason: str
    kvm_device: bool
    vhost_vsock: bool
    cpus: tuple[HostCpu, ...]
    hugepages: tuple[HugepagePool, ...]
    hugetlbfs: tuple[HugetlbfsMount, ...]
    tee: TeeSupport
    qemu: QemuInfo
    libvirt: LibvirtInfo
    numa_nodes: tuple[int, ...] = (0,)
    cpu_flags: frozenset[str] = field(default_factory=frozenset)

    def hugepage_pools_of(self, size_kib: int, node: int | None = None) -> list[HugepagePool]:
        """The pools of ``size_kib`` pages on ``node``; when None, every node's (or the system-wide pool where
        the kernel reports no nodes)."""
        pools = [p for p in self.hugepages if p.size_kib == size_kib]
        per_node = [p for p in pools if p.node is not None]
        if node is not None:
            return [p for p in per_node if p.node == node]
        return per_node or pools

    def free_hugepages(self, size_kib: int, node: int | None = None) -> int:
        """Free pages of ``size_kib`` on ``node`` (all nodes when None)."""
        return sum(p.free for p in self.hugepage_pools_of(size_kib, node))

    def hugetlbfs_mount(self, size_kib: int) -> HugetlbfsMount | None:
        return next((m for m in self.hugetlbfs if m.pagesize_kib == size_kib), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["qemu"]["object_types"] = sorted(self.qemu.object_types)
        data["qemu"]["device_types"] = sorted(self.qemu.device_types)
        data["qemu"]["machine_types"] = sorted(self.qemu.machine_types)
        data["qemu"]["firmware_files"] = sorted(self.qemu.firmware_files)
        data["cpu_flags"] = sorted(self.cpu_flags)
        return data
