"""Fixture host trees for the probe: the files of /proc, /sys and /dev that it reads, and a QEMU that answers
with captured help texts (QEMU 7.2's, plus the object types a newer QEMU adds)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "qemu-7.2"


@dataclass
class HostTree:
    """A host to write under a directory: CPUs per node, SMT, flags, devices, hugepages, TEE switches."""

    nodes: int = 1
    cores_per_node: int = 2
    smt: bool = False
    flags: tuple[str, ...] = ("fpu", "sse4_2", "avx2")
    kvm: bool = False
    vhost_vsock: bool = False
    hugepages_2m: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (total, free)
    hugetlbfs: tuple[str, ...] = ()
    sev: bool = False
    sev_snp: bool = False
    tdx: bool = False
    cbitpos: int | None = None
    qemu_version: str = "7.2.22"
    extra_objects: tuple[str, ...] = ()
    offline: tuple[int, ...] = ()
    sgx_devices: tuple[str, ...] = ()  # of sgx_vepc, sgx_enclave, sgx_provision under /dev
    epc_bytes: dict[int, int] = field(default_factory=dict)  # node -> nodeN/x86/sgx_total_bytes

    def cpus(self) -> list[tuple[int, int, int]]:
        """(cpu, core, node): with SMT, core c's threads are c and c + total cores (Linux's numbering)."""
        threads = 2 if self.smt else 1
        total_cores = self.nodes * self.cores_per_node
        rows = []
        for thread in range(threads):
            for core in range(total_cores):
                rows.append((thread * total_cores + core, core, core // self.cores_per_node))
        return rows

    def write(self, root: Path) -> Path:
        cpus = self.cpus()
        put(root / "proc/cpuinfo", "".join(
            f"processor\t: {cpu}\nflags\t\t: {' '.join(self.flags)}\n\n" for cpu, _, _ in cpus
        ))  # fmt: skip
        put(root / "proc/meminfo", "MemTotal:       24000000 kB\nHugepagesize:       2048 kB\n")
        mounts = "proc /proc proc rw 0 0\n" + "".join(
            f"none {path} hugetlbfs rw,relatime,pagesize=2M 0 0\n" for path in self.hugetlbfs
        )
        put(root / "proc/mounts", mounts)
        online = [c for c, _, _ in cpus if c not in self.offline]
        put(root / "sys/devices/system/cpu/online", ",".join(map(str, online)) + "\n")
        for cpu, core, _node in cpus:
            siblings = sorted(c for c, k, _ in cpus if k == core)
            topo = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
            put(topo / "core_id", f"{core % self.cores_per_node}\n")
            put(topo / "physical_package_id", f"{core // self.cores_per_node}\n")
            put(topo / "thread_siblings_list", ",".join(map(str, siblings)) + "\n")
        for node in range(self.nodes):
            base = root / f"sys/devices/system/node/node{node}"
            put(base / "cpulist", ",".join(str(c) for c, _, n in cpus if n == node) + "\n")
            total, free = self.hugepages_2m.get(node, (0, 0))
            put(base / "hugepages/hugepages-2048kB/nr_hugepages", f"{total}\n")
            put(base / "hugepages/hugepages-2048kB/free_hugepages", f"{free}\n")
        if self.kvm:
            put(root / "dev/kvm", "")
        if self.vhost_vsock:
            put(root / "dev/vhost-vsock", "")
        if self.sev or self.sev_snp:
            amd = root / "sys/module/kvm_amd/parameters"
            put(amd / "sev", "Y\n" if self.sev else "N\n")
            put(amd / "sev_es", "Y\n" if self.sev else "N\n")
            put(amd / "sev_snp", "Y\n" if self.sev_snp else "N\n")
            put(root / "dev/sev", "")
        if self.cbitpos is not None:  # a sparse /dev/cpu/0/cpuid with leaf 0x8000001F filled in
            cpuid = root / "dev/cpu/0/cpuid"
            cpuid.parent.mkdir(parents=True, exist_ok=True)
            with open(cpuid, "wb") as handle:
                handle.seek(0x8000001F)
                handle.write(struct.pack("<4I", 0x1B, self.cbitpos | (1 << 6), 0, 0))
        if self.tdx:
            put(root / "sys/module/kvm_intel/parameters/tdx", "Y\n")
        for device in self.sgx_devices:
            put(root / "dev" / device, "")
        for node, size in self.epc_bytes.items():
            put(root / f"sys/devices/system/node/node{node}/x86/sgx_total_bytes", f"{size}\n")
        self._write_qemu(root)
        return root

    def _write_qemu(self, root: Path) -> None:
        data = root / "captured"
        version = (CAPTURED / "version.txt").read_text().replace("7.2.22", self.qemu_version)
        put(data / "version.txt", version)
        objects = (CAPTURED / "object.txt").read_text() + "".join(f"  {o}\n" for o in self.extra_objects)
        put(data / "object.txt", objects)
        for name in ("device", "machine"):
            put(data / f"{name}.txt", (CAPTURED / f"{name}.txt").read_text())
        qemu = root / "usr/bin/qemu-system-x86_64"
        put(
            qemu,
            f"""#!/bin/sh
case "$1" in
  --version) cat {data}/version.txt ;;
  -object) cat {data}/object.txt ;;
  -device) cat {data}/device.txt ;;
  -machine) cat {data}/machine.txt ;;
esac
""",
        )
        qemu.chmod(0o755)
        put(root / "usr/share/qemu/qboot.rom", "")


def put(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


SNP_HOST = HostTree(
    flags=("fpu", "svm", "sev", "sev_es", "sev_snp"),
    kvm=True,
    vhost_vsock=True,
    sev=True,
    sev_snp=True,
    cbitpos=51,
    qemu_version="9.2.0",
    extra_objects=("sev-snp-guest",),
)
TDX_HOST = HostTree(flags=("fpu", "vmx", "tdx_host_platform"), kvm=True, vhost_vsock=True, tdx=True,
                    qemu_version="10.1.0", extra_objects=("tdx-guest",))  # fmt: skip
TWO_NODE_SMT_HOST = HostTree(nodes=2, cores_per_node=4, smt=True, flags=("fpu", "vmx"), kvm=True,
                             hugepages_2m={0: (512, 500), 1: (256, 256)}, offline=(15,))  # fmt: skip
SGX_HOST = HostTree(nodes=2, flags=("fpu", "vmx", "sgx", "sgx_lc"), kvm=True,
                    sgx_devices=("sgx_vepc", "sgx_enclave", "sgx_provision"),
                    epc_bytes={0: 64 << 20, 1: 128 << 20}, extra_objects=("memory-backend-epc",))  # fmt: skip
PVM_HOST = HostTree(flags=("fpu", "sse4_2"), kvm=True)  # /dev/kvm without vmx/svm: this CI machine's shape
