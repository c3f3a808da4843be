"""SGX EPC for a guest: ``-object memory-backend-epc`` per section, bound to the host NUMA node whose EPC it
takes, and ``sgx-epc.N.memdev``/``.node`` on the machine (QEMU docs/system/i386/sgx.rst, "To launch a SGX
numa guest"; ``node`` is QEMU 7.0's and required since), validated against the host's SGX and its EPC per
node."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from harness.host import capability
from harness.host.model import Accel, HostInfo
from harness.qemu.errors import MemorySizeError, OptionInvalid, SgxUnavailable
from harness.qemu.options import check_id

# What the guest's CPU needs to run enclaves: SGX, launch control (its own launch enclave policy), and the
# provisioning key (quoting enclaves derive their keys from it).
CPU_FEATURES = ("+sgx", "+sgxlc", "+sgx-provisionkey")


@dataclass(frozen=True)
class EpcSection:
    """One EPC section of a guest: ``size_mib`` of the EPC of host NUMA node ``host_node`` (bound there), seen
    by the guest on its NUMA node ``guest_node`` (0: a VMSpec describes no guest NUMA topology)."""

    id: str
    size_mib: int
    host_node: int = 0
    guest_node: int = 0
    prealloc: bool = True

    def args(self) -> list[str]:
        prealloc = ",prealloc=on" if self.prealloc else ""
        bind = f",host-nodes={self.host_node},policy=bind"
        return ["-object", f"memory-backend-epc,id={self.id},size={self.size_mib}M{prealloc}{bind}"]

    def machine_options(self, index: int) -> list[str]:
        return [f"sgx-epc.{index}.memdev={self.id}", f"sgx-epc.{index}.node={self.guest_node}"]

    def validate(self, name: str) -> None:
        """Raise for a section no host could give the guest ``name`` (E315/E302)."""
        check_id("object", self.id)
        if self.size_mib < 1:
            raise MemorySizeError(
                f"{name}: EPC section {self.id} has {self.size_mib} MiB",
                hint="give each EPC section a positive size_mib",
                id=self.id,
            )
        if self.guest_node != 0:
            raise OptionInvalid(
                f"{name}: EPC section {self.id} is for guest NUMA node {self.guest_node}",
                hint="a VMSpec has one guest NUMA node: use guest_node=0 (host_node picks the host's EPC)",
                id=self.id,
            )


def validate_epc(name: str, sections: Sequence[EpcSection], host: HostInfo, accel: Accel) -> None:
    """Raise unless ``host`` can give the guest ``name`` these sections (E315/E302/E319, every reason)."""
    for section in sections:
        section.validate(name)
    missing = capability.sgx_missing(host)
    if host.qemu.version is not None and host.qemu.version < capability.SGX_QEMU:
        found = ".".join(map(str, host.qemu.version))
        missing.append(f"QEMU {found} is older than 7.0, the first with sgx-epc.N.node")
    if not host.qemu.has("memory-backend-epc"):
        missing.append("QEMU has no memory-backend-epc" + capability.EPC_BACKEND_NOTE)
    if accel != "kvm":
        missing.append(f"SGX guests need KVM, and this guest runs under {accel}")
    wanted = Counter[int]()
    for section in sections:
        wanted[section.host_node] += section.size_mib * 1024
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
