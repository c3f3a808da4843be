"""SGX EPC for a guest: ``-object memory-backend-epc`` per section and ``sgx-epc.N.memdev``/``.node`` on the
machine (QEMU docs/system/i386/sgx.rst), validated against the host's SGX and its EPC per NUMA node."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from harness.host import capability
from harness.host.model import Accel, HostInfo
from harness.qemu.errors import MemorySizeError, SgxUnavailable
from harness.qemu.options import check_id

# What the guest's CPU needs to run enclaves: SGX, launch control (its own launch enclave policy), and the
# provisioning key (quoting enclaves derive their keys from it).
CPU_FEATURES = ("+sgx", "+sgxlc", "+sgx-provisionkey")


@dataclass(frozen=True)
class EpcSection:
    """One EPC section of a guest: ``size_mib`` of the host's EPC on host NUMA node ``node``."""

    id: str
    size_mib: int
    node: int = 0
    prealloc: bool = True

    def args(self) -> list[str]:
        prealloc = ",prealloc=on" if self.prealloc else ""
        return ["-object", f"memory-backend-epc,id={self.id},size={self.size_mib}M{prealloc}"]

    def machine_options(self, index: int) -> list[str]:
        return [f"sgx-epc.{index}.memdev={self.id}", f"sgx-epc.{index}.node={self.node}"]


def validate_epc(name: str, sections: Sequence[EpcSection], host: HostInfo, accel: Accel) -> None:
    """Raise unless ``host`` can give the guest ``name`` these sections (E315/E302/E319, every reason)."""
    for section in sections:
        check_id("object", section.id)
        if section.size_mib < 1:
            raise MemorySizeError(
                f"{name}: EPC section {section.id} has {section.size_mib} MiB",
                hint="give each EPC section a positive size_mib",
                id=section.id,
            )
    missing = capability.sgx_missing(host)
    if not host.qemu.has("memory-backend-epc"):
        missing.append("QEMU has no memory-backend-epc (QEMU >= 6.2 built with SGX)")
    if accel != "kvm":
        missing.append(f"SGX guests need KVM, and this guest runs under {accel}")
    wanted = Counter[int]()
    for section in sections:
        wanted[section.node] += section.size_mib * 1024
    for node, kib in sorted(wanted.items()):
        if node not in host.numa_nodes:
            missing.append(f"EPC asked on node {node}, which the host does not have")
        elif kib > host.tee.epc_kib(node):
            missing.append(
                f"{kib // 1024} MiB of EPC asked on node {node}, which has {host.tee.epc_kib(node) // 1024}"
            )
    if missing:
        raise SgxUnavailable(
            f"{name}: this host cannot give the guest its SGX EPC: " + "; ".join(missing),
            hint="run on an SGX host (`teelab doctor --require sgx`), or drop epc= from the spec",
            missing=missing,
        )
